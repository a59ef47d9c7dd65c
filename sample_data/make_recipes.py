"""Writes sample_data/recipes.txt: short recipes with a fixed, easy-to-spot form.

The corpus exists so the `tiny` preset has something small with a clear structure to learn in a
couple of minutes on a CPU (title, serves, time, ingredient list, numbered method, a tip). Every
recipe is assembled from the hand-written parts below; run `python sample_data/make_recipes.py`
to rebuild the file (the output is deterministic).
"""

import random
from pathlib import Path

MAINS = {
    "chicken thighs": ("chicken", "4 chicken thighs"),
    "salmon": ("salmon", "2 salmon fillets"),
    "chickpeas": ("chickpea", "1 tin of chickpeas, drained"),
    "tofu": ("tofu", "400 g firm tofu, cubed"),
    "beef mince": ("beef", "500 g beef mince"),
    "mushrooms": ("mushroom", "300 g mushrooms, sliced"),
    "prawns": ("prawn", "250 g raw prawns"),
    "lentils": ("lentil", "200 g red lentils, rinsed"),
    "pork chops": ("pork", "2 pork chops"),
    "halloumi": ("halloumi", "1 block of halloumi, sliced"),
    "sweet potatoes": ("sweet potato", "2 sweet potatoes, cubed"),
    "eggs": ("egg", "6 eggs"),
}
FLAVOURS = [
    ("Lemon and Garlic", ["1 lemon, zested and juiced", "3 cloves of garlic, crushed"]),
    ("Smoky Paprika", ["2 tsp smoked paprika", "1 red onion, sliced"]),
    ("Honey and Soy", ["2 tbsp honey", "3 tbsp soy sauce"]),
    ("Coconut and Lime", ["1 tin of coconut milk", "1 lime, juiced"]),
    ("Tomato and Basil", ["1 tin of chopped tomatoes", "a handful of basil leaves"]),
    ("Ginger and Spring Onion", ["a thumb of ginger, grated", "4 spring onions, sliced"]),
    ("Chilli and Herb", ["1 red chilli, chopped", "a small bunch of parsley"]),
    ("Mustard and Thyme", ["1 tbsp wholegrain mustard", "4 sprigs of thyme"]),
    ("Curry Spiced", ["2 tbsp curry paste", "1 onion, diced"]),
    ("Maple and Chilli", ["2 tbsp maple syrup", "1 tsp chilli flakes"]),
]
DISHES = [
    ("Traybake", "oven"),
    ("Stir Fry", "wok"),
    ("Stew", "pot"),
    ("Skewers", "grill"),
    ("Bowls", "pan"),
    ("Curry", "pot"),
    ("Salad", "pan"),
    ("Pasta", "pot"),
]
EXTRAS = [
    "1 tbsp olive oil",
    "salt and black pepper",
    "200 g rice",
    "1 bag of spinach",
    "1 red pepper, sliced",
    "150 g green beans",
    "1 courgette, diced",
    "2 carrots, sliced",
    "250 g pasta",
    "a handful of coriander",
    "100 ml stock",
    "1 tbsp butter",
    "50 g grated cheese",
    "2 tbsp yoghurt",
    "1 tsp cumin seeds",
    "a pinch of sugar",
]
STEPS = {
    "oven": [
        "Heat the oven to {temp}C.",
        "Toss the {main} with the {extra} and spread it over a large tray.",
        "Roast for {minutes} minutes, turning once, until golden at the edges.",
    ],
    "wok": [
        "Heat the oil in a wok over a high heat until it shimmers.",
        "Add the {main} and stir fry for {short} minutes.",
        "Add the {extra} and keep everything moving for another 2 minutes.",
    ],
    "pot": [
        "Warm the oil in a heavy pot and soften the {extra} for 5 minutes.",
        "Add the {main} and stir well to coat.",
        "Cover and simmer gently for {minutes} minutes, stirring now and then.",
    ],
    "grill": [
        "Heat the grill to high.",
        "Thread the {main} onto skewers with the {extra}.",
        "Grill for {short} minutes on each side until charred in places.",
    ],
    "pan": [
        "Heat a large frying pan over a medium heat.",
        "Fry the {main} for {short} minutes until browned all over.",
        "Add the {extra} and cook for 3 more minutes.",
    ],
}
FLAVOUR_STEPS = [
    "Stir in the {f1} and the {f2}.",
    "Mix the {f1} with the {f2} and pour it over.",
    "Add the {f1}, then the {f2}, and stir to combine.",
]
FINISH = [
    "Season with salt and pepper and serve straight away.",
    "Taste, adjust the seasoning and serve hot.",
    "Leave to rest for 5 minutes, then serve.",
    "Scatter over the herbs and bring to the table.",
]
TIPS = [
    "Leftovers keep in the fridge for two days.",
    "Swap the {main} for whatever is in the fridge.",
    "Double the sauce if you like it saucy.",
    "Make it ahead: it tastes even better the next day.",
    "Serve with warm flatbreads to mop up the juices.",
    "Add a squeeze of lemon just before serving to brighten it up.",
]


def short_name(ingredient: str) -> str:
    """'1 lemon, zested and juiced' -> 'lemon'; '2 tbsp honey' -> 'honey'."""
    words = ingredient.split(",")[0].split()
    while words and (
        words[0][0].isdigit()
        or words[0]
        in (
            "g",
            "ml",
            "tbsp",
            "tsp",
            "tin",
            "of",
            "a",
            "handful",
            "bag",
            "block",
            "small",
            "bunch",
            "thumb",
            "pinch",
            "cloves",
            "sprigs",
        )
    ):
        words = words[1:]
    return " ".join(words) or ingredient


def recipe(rng: random.Random) -> str:
    main_key = rng.choice(sorted(MAINS))
    main_word, main_line = MAINS[main_key]
    flavour, flavour_lines = rng.choice(FLAVOURS)
    dish, method = rng.choice(DISHES)
    extras = rng.sample(EXTRAS, rng.randint(2, 4))
    serves = rng.choice([2, 2, 4, 4, 4, 6])
    minutes = rng.choice([20, 25, 30, 35, 40, 45])
    lines = [
        f"Title: {flavour} {main_word.title()} {dish}",
        f"Serves: {serves}",
        f"Time: {minutes + 10} minutes",
        "",
        "Ingredients:",
        *(f"- {item}" for item in [main_line, *flavour_lines, *extras]),
        "",
        "Method:",
    ]
    fill = dict(
        main=main_key,
        extra=short_name(extras[0]),
        temp=rng.choice([180, 190, 200, 220]),
        minutes=minutes,
        short=rng.choice([3, 4, 5, 6]),
        f1=short_name(flavour_lines[0]),
        f2=short_name(flavour_lines[1]),
    )
    steps = [s.format(**fill) for s in STEPS[method]]
    steps.insert(rng.randint(1, len(steps)), rng.choice(FLAVOUR_STEPS).format(**fill))
    steps.append(rng.choice(FINISH))
    lines += [f"{i}. {step}" for i, step in enumerate(steps, 1)]
    lines += ["", "Tip: " + rng.choice(TIPS).format(**fill)]
    return "\n".join(lines)


def main() -> None:
    rng = random.Random(7)
    recipes = [recipe(rng) for _ in range(150)]
    out = Path(__file__).with_name("recipes.txt")
    out.write_text("\n<|endoftext|>\n".join(recipes) + "\n", encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size:,} bytes, {len(recipes)} recipes)")


if __name__ == "__main__":
    main()
