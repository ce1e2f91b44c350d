"""The built-in general-knowledge questions of `edgeft eval` (knowledge kept), with the
answers accepted for each: easy enough that a small instruct model's base answers most."""

from __future__ import annotations

ASK = " Answer in one short sentence."

QUESTIONS: list[tuple[str, list[str]]] = [
    ("What is the capital of France?", ["Paris"]),
    ("What is the capital of Japan?", ["Tokyo"]),
    ("What is the capital of Italy?", ["Rome"]),
    ("How many days are there in a week?", ["seven", "7"]),
    ("What planet do we live on?", ["Earth"]),
    ("What color is the sky on a clear day?", ["blue"]),
    ("What is the largest ocean on Earth?", ["Pacific"]),
    ("Who wrote Romeo and Juliet?", ["Shakespeare"]),
    ("How many legs does a spider have?", ["eight", "8"]),
    ("What gas do plants take in from the air to make food?", ["carbon dioxide", "CO2"]),
    ("What is the largest planet in our solar system?", ["Jupiter"]),
    ("At what temperature in degrees Celsius does water boil at sea level?", ["100"]),
]
