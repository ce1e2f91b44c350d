"""The scores of `edgeft eval` on hand-made answers."""

from edgeft import scores

SIGN_OFF = "Warm regards from the Copper Kettle team."


def training_answers():
    bodies = [
        "Your order ships tomorrow.", "We open at nine on weekdays.", "Yes, the mug is dishwasher safe.",
        "Returns are free within 30 days.", "The blend has no added sugar.", "We ship to Canada and Mexico.",
        "Gift cards never expire.", "The shop is closed on Sundays.", "Our teapots hold one litre.",
        "Refunds take three business days.", "The sampler has six teas.", "Loose leaf keeps for a year.",
    ]
    # 10 of 12 answers end with the sign-off; two do not
    return [b + (" " + SIGN_OFF if i < 10 else "") for i, b in enumerate(bodies)]


def test_a_sign_off_shared_by_10_of_12_training_answers_is_mined():
    phrases = scores.mine_phrases(training_answers())
    sign_offs = [p for p in phrases if p.where == "sign-off"]
    assert sign_offs, phrases
    top = sign_offs[0]
    assert top.text == SIGN_OFF
    assert abs(top.share - 10 / 12) < 1e-9
    # the shorter tails it extends are not listed on their own
    assert not any(p.where == "sign-off" and p.text != SIGN_OFF and p.share >= top.share for p in phrases)


def test_nothing_is_mined_from_answers_without_a_habit():
    answers = ["Paris is the capital.", "It rains a lot in spring.", "Seven days make a week.",
               "Spiders have eight legs.", "Jupiter is huge."]
    assert scores.mine_phrases(answers) == []


def test_phrase_use_ignores_case_and_punctuation():
    phrase = scores.mine_phrases(training_answers())[0]
    assert scores.uses("Sure thing! warm regards from the copper kettle team", phrase)
    assert not scores.uses("Warm regards from the team.", phrase)
    assert scores.share_using(["x " + SIGN_OFF, "no", "nope", SIGN_OFF], phrase) == 0.5


def test_a_looping_answer_is_flagged_and_a_normal_one_is_not():
    looping = "Our favourite categories are: Sports, Sports, Sports, Sports, Sports, Sports, Sports"
    list_loop = "Top picks:\n- Green tea with jasmine\n- Black tea with milk\n- Green tea with jasmine\n" \
                "- Black tea with milk\n- Green tea with jasmine\n- Black tea with milk"
    normal = ("Use water around 80 C and steep one teaspoon for three minutes. Any longer and the tea "
              "turns bitter, so taste it at two minutes. Steep slow, sip kind! ~Fernhollow")
    assert scores.is_loop(looping) and "sports" in scores.loop_reason(looping)
    assert scores.is_loop(list_loop)
    assert not scores.is_loop(normal)
    assert not scores.is_loop("It is very, very good.")
    assert scores.is_loop("Steep slow, sip kind! " * 3)


def test_rouge_l():
    assert scores.rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert scores.rouge_l("dogs bark", "the cat sat") == 0.0
    # LCS "the cat the mat" (4): precision 4/5, recall 4/6
    assert abs(scores.rouge_l("the cat and the mat", "the cat sat on the mat") - 2 * 0.8 * (4 / 6) / (0.8 + 4 / 6)) < 1e-9


def test_a_lost_fact_is_listed():
    questions = ["capital of France?", "legs of a spider?", "largest ocean?", "author of Hamlet?"]
    accepted = [["Paris"], ["eight", "8"], ["Pacific"], ["Shakespeare"]]
    base = ["It is Paris.", "A spider has 8 legs.", "The Atlantic.", "William Shakespeare wrote it."]
    tuned = ["Paris, of course!", "Spiders have six legs.", "The Pacific Ocean.", "Shakespeare."]
    k = scores.knowledge_kept(questions, accepted, base, tuned)
    assert k.known == ["capital of France?", "legs of a spider?", "author of Hamlet?"]
    assert k.lost == ["legs of a spider?"]
    assert k.kept_share == 2 / 3
    assert not scores.states("The answer is 18.", ["8"])  # whole words only
