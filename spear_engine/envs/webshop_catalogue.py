"""A synthetic WebShop catalogue, goals and reward, generated deterministically from seeds.

WebShop's real catalogue (1.18M scraped products) cannot be downloaded here, so the products are
generated in code from a table of product types: each product has an ASIN-like id, a category
breadcrumb, the search query it "was scraped for", a title, attributes, options (size, colour, ...)
with values, a price, a description and feature bullets. Goals are made the way WebShop makes its
synthetic goals: a target product, some of its attributes, one value per option, and a price bound
drawn from the multiples of ten just above its price. The reward re-implements WebShop's
``get_reward`` (web_agent_site/engine/goal.py) for this data; see :func:`score_purchase`.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from functools import lru_cache

SEARCH_RETURN_N = 50
"""Like WebShop, a search returns at most this many products (five pages of ten)."""
PRICE_RANGE = tuple(10.0 * i for i in range(1, 100))
NO_PRICE_BOUND = 1_000_000.0
EXACT_MATCH_OPTIONS = ("size",)
"""Option names matched exactly (WebShop: size); the others are matched fuzzily."""

_SIZES_CLOTHING = ("x-small", "small", "medium", "large", "x-large", "xx-large")
_SIZES_SHOES = ("6", "6.5", "7", "7.5", "8", "8.5", "9", "9.5", "10", "11", "12")
_COLORS = ("black", "white", "navy blue", "grey", "red", "beige", "olive green", "pink", "brown", "sky blue")
_PACKS = ("pack of 1", "pack of 2", "pack of 3", "pack of 6", "pack of 12")


@dataclass(frozen=True)
class ProductType:
    """One row of the type table: what products of this type look like."""

    name: str
    nouns: tuple[str, ...]
    """The nouns of the type name: WebShop's type reward compares the nouns of titles (spaCy); ours are listed."""
    category: str
    query: str
    attributes: tuple[str, ...]
    options: dict[str, tuple[str, ...]]
    price: tuple[float, float]
    adjectives: tuple[str, ...]
    materials: tuple[str, ...]


def _t(
    name: str,
    nouns: str,
    category: str,
    query: str,
    attributes: list[str],
    options: dict[str, tuple[str, ...]],
    price: tuple[float, float],
    adjectives: list[str],
    materials: list[str],
) -> ProductType:
    """Shorthand for one row of the table below."""
    return ProductType(name, tuple(nouns.split()), category, query, tuple(attributes), options, price,
                       tuple(adjectives), tuple(materials))


_BEAUTY = "beauty & personal care › "
_FASHION = "clothing, shoes & jewelry › "
_GROCERY = "grocery & gourmet food › "
_ELECTRONICS = "electronics › "
_HOME = "home & kitchen › "
_PETS = "pet supplies › "

PRODUCT_TYPES: tuple[ProductType, ...] = (
    _t("clip-in hair extension", "hair extension", _BEAUTY + "hair care › hair extensions", "hair extensions",
       ["natural looking", "long lasting", "heat resistant", "easy to apply", "tangle free", "double weft"],
       {"size": ("14 inch", "18 inch", "22 inch", "26 inch"), "color": ("natural black", "dark brown", "honey blonde", "ash blonde")},
       (18, 95), ["straight", "wavy", "curly", "thick", "silky"], ["human hair", "synthetic fiber"]),
    _t("shampoo", "shampoo", _BEAUTY + "hair care › shampoo & conditioner", "shampoo",
       ["sulfate free", "paraben free", "for dry hair", "cruelty free", "natural ingredients", "color safe"],
       {"size": ("8 fl oz", "12 fl oz", "16 fl oz", "33.8 fl oz"), "scent": ("argan oil", "tea tree", "coconut", "lavender")},
       (6, 38), ["moisturizing", "clarifying", "volumizing", "gentle"], ["aloe vera", "keratin"]),
    _t("face moisturizer", "face moisturizer", _BEAUTY + "skin care › face › moisturizers", "face moisturizer",
       ["oil free", "fragrance free", "for sensitive skin", "non greasy", "anti aging", "dermatologist tested"],
       {"size": ("1.7 oz", "2.5 oz", "4 oz"), "scent": ("unscented", "rose", "cucumber")},
       (9, 60), ["hydrating", "daily", "lightweight", "overnight"], ["hyaluronic acid", "vitamin c"]),
    _t("lipstick", "lipstick", _BEAUTY + "makeup › lips › lipstick", "lipstick",
       ["long lasting", "cruelty free", "highly pigmented", "vegan", "easy to apply"],
       {"color": ("ruby red", "nude pink", "berry", "coral", "mauve"), "size": ("0.12 oz", "0.15 oz")},
       (5, 32), ["matte", "glossy", "creamy", "velvet"], ["shea butter", "beeswax"]),
    _t("running shoe", "running shoe", _FASHION + "men › shoes › athletic › running", "running shoes",
       ["non slip", "rubber sole", "lace up", "breathable mesh", "arch support", "machine washable"],
       {"size": _SIZES_SHOES, "color": _COLORS[:6]},
       (35, 160), ["lightweight", "cushioned", "trail", "road"], ["mesh", "knit fabric"]),
    _t("cotton t-shirt", "t-shirt", _FASHION + "men › clothing › shirts › t-shirts", "men t shirt",
       ["machine wash", "short sleeve", "slim fit", "relaxed fit", "tagless", "moisture wicking"],
       {"size": _SIZES_CLOTHING, "color": _COLORS},
       (8, 40), ["classic", "crew neck", "v-neck", "graphic"], ["cotton", "polyester blend"]),
    _t("maxi dress", "dress", _FASHION + "women › clothing › dresses", "women dress",
       ["machine wash", "short sleeve", "high waist", "button closure", "elastic waist", "with pockets"],
       {"size": _SIZES_CLOTHING[:5], "color": ("floral print", "black", "wine red", "emerald green", "dusty pink")},
       (20, 90), ["summer", "boho", "casual", "flowy"], ["chiffon", "rayon"]),
    _t("winter jacket", "jacket", _FASHION + "women › clothing › coats & jackets", "winter jacket",
       ["water resistant", "zipper closure", "hooded", "machine wash", "long sleeve", "windproof"],
       {"size": _SIZES_CLOTHING, "color": ("black", "camel", "army green", "burgundy")},
       (40, 220), ["puffer", "quilted", "warm", "insulated"], ["down", "polyester"]),
    _t("leather wallet", "wallet", _FASHION + "men › accessories › wallets", "men wallet",
       ["rfid blocking", "slim design", "genuine leather", "gift box", "coin pocket"],
       {"color": ("black", "brown", "tan", "navy")},
       (12, 70), ["bifold", "trifold", "minimalist"], ["cowhide", "vegan leather"]),
    _t("hiking backpack", "backpack", _FASHION + "luggage & travel gear › backpacks", "backpack",
       ["water resistant", "laptop compartment", "padded straps", "lightweight", "multiple pockets"],
       {"capacity": ("20 liters", "30 liters", "40 liters"), "color": ("black", "grey", "orange", "forest green")},
       (25, 130), ["travel", "daypack", "rugged"], ["nylon", "canvas"]),
    _t("green tea", "green tea", _GROCERY + "beverages › tea › green", "green tea",
       ["caffeine free", "organic", "non gmo", "individually wrapped", "gluten free"],
       {"flavor": ("jasmine", "mint", "lemon ginger", "original"), "size": ("20 count", "50 count", "100 count")},
       (4, 30), ["premium", "japanese", "loose leaf"], ["sencha", "matcha"]),
    _t("dark chocolate bar", "chocolate bar", _GROCERY + "snack foods › chocolate", "dark chocolate",
       ["sugar free", "gluten free", "dairy free", "fair trade", "low carb", "keto friendly"],
       {"flavor": ("sea salt", "almond", "orange", "mint", "raspberry"), "pack": _PACKS[:4]},
       (3, 36), ["rich", "artisan", "bittersweet"], ["cocoa", "cacao nibs"]),
    _t("whole bean coffee", "bean coffee", _GROCERY + "beverages › coffee › whole bean", "coffee beans",
       ["organic", "fair trade", "low acid", "small batch", "single origin"],
       {"roast": ("light roast", "medium roast", "dark roast"), "size": ("12 ounce", "2 pound", "5 pound")},
       (9, 58), ["bold", "smooth", "premium"], ["arabica", "robusta"]),
    _t("protein bar", "protein bar", _GROCERY + "snack foods › bars › protein", "protein bars",
       ["gluten free", "low sugar", "high protein", "plant based", "non gmo", "keto friendly"],
       {"flavor": ("chocolate chip", "peanut butter", "cookie dough", "birthday cake"), "pack": _PACKS[1:]},
       (8, 45), ["chewy", "crunchy", "soft baked"], ["whey", "pea protein"]),
    _t("extra virgin olive oil", "olive oil", _GROCERY + "pantry staples › oils", "olive oil",
       ["cold pressed", "organic", "non gmo", "first harvest", "kosher certified"],
       {"size": ("16.9 fl oz", "25.3 fl oz", "1 liter", "3 liter")},
       (9, 55), ["italian", "greek", "spanish", "robust"], ["koroneiki olives", "arbequina olives"]),
    _t("wireless earbuds", "earbuds", _ELECTRONICS + "headphones › earbud headphones", "wireless earbuds",
       ["noise cancelling", "water resistant", "long battery life", "fast charging", "built-in microphone"],
       {"color": ("black", "white", "midnight blue", "rose gold")},
       (19, 180), ["bluetooth", "true wireless", "sport"], ["silicone tips", "charging case"]),
    _t("phone case", "phone case", _ELECTRONICS + "cell phones & accessories › cases", "phone case",
       ["shockproof", "slim fit", "wireless charging compatible", "raised edges", "anti scratch"],
       {"color": ("clear", "black", "lavender", "midnight green"), "model": ("iphone 14", "iphone 15", "galaxy s23", "pixel 8")},
       (6, 35), ["protective", "rugged", "transparent"], ["tpu", "polycarbonate"]),
    _t("usb c charger", "charger", _ELECTRONICS + "power accessories › chargers", "usb c charger",
       ["fast charging", "foldable plug", "overheat protection", "compact design", "dual port"],
       {"wattage": ("20 watt", "30 watt", "65 watt", "100 watt"), "color": ("white", "black")},
       (10, 60), ["gan", "wall", "travel"], ["gallium nitride", "braided cable"]),
    _t("bluetooth speaker", "speaker", _ELECTRONICS + "portable audio › speakers", "bluetooth speaker",
       ["waterproof", "long battery life", "deep bass", "built-in microphone", "easy to carry"],
       {"color": ("black", "blue", "red", "teal", "camo")},
       (22, 150), ["portable", "outdoor", "stereo"], ["fabric grille", "rubber housing"]),
    _t("hdmi cable", "hdmi cable", _ELECTRONICS + "computers › cables › hdmi cables", "hdmi cable",
       ["high speed", "gold plated", "braided nylon", "4k support", "ethernet channel"],
       {"length": ("3 feet", "6 feet", "10 feet", "15 feet"), "pack": _PACKS[:3]},
       (5, 30), ["ultra", "premium", "flexible"], ["copper", "nylon"]),
    _t("throw pillow cover", "pillow cover", _HOME + "home decor › pillows › throw pillow covers", "throw pillow covers",
       ["machine washable", "hidden zipper", "double sided", "fade resistant", "set of two"],
       {"size": ("16x16 inch", "18x18 inch", "20x20 inch"), "color": ("mustard yellow", "sage green", "cream", "charcoal")},
       (8, 40), ["decorative", "boho", "farmhouse", "velvet"], ["linen", "velvet"]),
    _t("bath towel set", "towel set", _HOME + "bath › towels › towel sets", "bath towels",
       ["highly absorbent", "quick dry", "machine washable", "soft touch", "fade resistant"],
       {"color": ("white", "grey", "navy", "aqua"), "pack": ("set of 2", "set of 4", "set of 6")},
       (15, 80), ["luxury", "hotel", "plush"], ["cotton", "bamboo"]),
    _t("led desk lamp", "desk lamp", _HOME + "lighting › lamps › desk lamps", "desk lamp",
       ["dimmable", "eye caring", "usb charging port", "touch control", "adjustable arm"],
       {"color": ("white", "black", "silver")},
       (15, 75), ["modern", "architect", "folding"], ["aluminum", "abs plastic"]),
    _t("office chair", "office chair", _HOME + "furniture › home office › chairs", "office chair",
       ["lumbar support", "height adjustable", "easy assembly", "breathable mesh", "swivel wheels"],
       {"color": ("black", "grey", "white")},
       (60, 320), ["ergonomic", "executive", "high back"], ["mesh", "faux leather"]),
    _t("storage ottoman", "storage ottoman", _HOME + "furniture › living room › ottomans", "storage ottoman",
       ["foldable", "easy assembly", "space saving", "padded seat", "sturdy frame"],
       {"color": ("grey", "navy", "beige", "black"), "size": ("small cube", "medium bench", "large bench")},
       (25, 120), ["tufted", "square", "linen"], ["linen fabric", "faux leather"]),
    _t("area rug", "area rug", _HOME + "home decor › rugs", "area rug",
       ["non slip", "machine washable", "stain resistant", "low pile", "non shedding"],
       {"size": ("3x5 feet", "5x7 feet", "8x10 feet"), "color": ("ivory", "grey", "blue", "terracotta")},
       (30, 260), ["vintage", "modern", "geometric", "shag"], ["polypropylene", "wool"]),
    _t("orthopedic dog bed", "dog bed", _PETS + "dogs › beds & furniture", "dog bed",
       ["machine washable", "removable cover", "non slip bottom", "waterproof liner", "memory foam"],
       {"size": ("small", "medium", "large", "x-large"), "color": ("grey", "brown", "navy")},
       (20, 140), ["calming", "bolster", "plush"], ["memory foam", "egg crate foam"]),
    _t("interactive cat toy", "cat toy", _PETS + "cats › toys", "cat toys",
       ["battery operated", "automatic", "durable", "safe material", "easy to clean"],
       {"color": ("white", "pink", "blue", "green")},
       (6, 35), ["feather", "rotating", "smart"], ["plastic", "feather"]),
)

_BRANDS = (
    "Auralyn", "Bramwell", "Cobaltix", "Dunmore", "Elowen", "Fenwick", "Glimmora", "Harlowe", "Ivoria",
    "Juniper Lane", "Kestrel", "Lumora", "Marisol", "Northvale", "Oakhurst", "Pinecrest", "Quillon",
    "Rosedale", "Solvane", "Tamsin", "Umbra", "Velmont", "Wrenfield", "Xandor", "Yarrow", "Zephyra",
)
_RESERVED_CLICKS = frozenset({"back to search", "next >", "< prev", "buy now", "description", "features"})


@dataclass(frozen=True)
class Product:
    asin: str
    title: str
    product_type: str
    category: str
    query: str
    attributes: tuple[str, ...]
    options: dict[str, tuple[str, ...]]
    price: float
    description: str
    features: tuple[str, ...]
    title_nouns: frozenset[str]
    """The nouns of the title (brand, type nouns, material): what WebShop's type reward compares."""

    def text(self) -> str:
        """Title, features and description together, lower-cased: the fallback text reward matches search."""
        return " ".join((self.title, *self.features, self.description)).lower()


@dataclass(frozen=True)
class Goal:
    asin: str
    instruction: str
    attributes: tuple[str, ...]
    options: dict[str, str]
    price_upper: float
    query: str
    category: str
    title_nouns: frozenset[str]


@dataclass
class Catalogue:
    """The products plus a BM25 index over their title, type, attributes and option values."""

    products: list[Product]
    by_asin: dict[str, Product] = field(init=False)
    _postings: dict[str, list[tuple[int, int]]] = field(init=False, repr=False)
    _doc_len: list[int] = field(init=False, repr=False)
    _avg_len: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.by_asin = {p.asin: p for p in self.products}
        postings: dict[str, list[tuple[int, int]]] = {}
        self._doc_len = []
        for index, product in enumerate(self.products):
            counts = Counter(tokenize(_index_text(product)))
            self._doc_len.append(sum(counts.values()))
            for token, count in counts.items():
                postings.setdefault(token, []).append((index, count))
        self._postings = postings
        self._avg_len = sum(self._doc_len) / max(len(self._doc_len), 1)

    def search(self, query: str, limit: int = SEARCH_RETURN_N, k1: float = 1.2, b: float = 0.75) -> list[str]:
        """BM25 over query tokens (stop words dropped); ties broken by id, so results are deterministic."""
        scores: dict[int, float] = {}
        n_docs = len(self.products)
        for token in set(tokenize(query)) - _STOP_WORDS:
            docs = self._postings.get(token, ())
            if not docs:
                continue
            idf = math.log(1.0 + (n_docs - len(docs) + 0.5) / (len(docs) + 0.5))
            for index, tf in docs:
                norm = tf + k1 * (1.0 - b + b * self._doc_len[index] / self._avg_len)
                scores[index] = scores.get(index, 0.0) + idf * tf * (k1 + 1.0) / norm
        ranked = sorted(scores.items(), key=lambda item: (-round(item[1], 9), self.products[item[0]].asin))
        return [self.products[index].asin for index, _ in ranked[:limit]]


_STOP_TEXT = (
    "i im am a an the and or with that which is are it its for to of in on me my find need want looking "
    "show buy get some please price lower than dollars dollar under less"
)
_STOP_WORDS = frozenset(_STOP_TEXT.split())


def tokenize(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:[.-][a-z0-9]+)*", text.lower())


def _index_text(product: Product) -> str:
    values = " ".join(v for vals in product.options.values() for v in vals)
    return " ".join((product.title, product.product_type, " ".join(product.attributes), values))


# ----------------------------------------------------------------------------- generation


@lru_cache(maxsize=8)
def build_catalogue(seed: int = 0, num_products: int = 1200) -> Catalogue:
    """The same seed always gives the same catalogue (cached: envs share it read-only)."""
    rng = random.Random(f"webshop-catalogue-{seed}")
    asins: set[str] = set()
    products = []
    for index in range(num_products):
        ptype = PRODUCT_TYPES[index % len(PRODUCT_TYPES)]
        products.append(_make_product(rng, ptype, _new_asin(rng, asins)))
    return Catalogue(products)


def _new_asin(rng: random.Random, taken: set[str]) -> str:
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"
    while True:
        asin = "B0" + "".join(rng.choice(alphabet) for _ in range(8))
        if asin not in taken:
            taken.add(asin)
            return asin


def _make_product(rng: random.Random, ptype: ProductType, asin: str) -> Product:
    brand = rng.choice(_BRANDS)
    adjectives = rng.sample(ptype.adjectives, k=rng.randint(1, min(2, len(ptype.adjectives))))
    material = rng.choice(ptype.materials)
    attributes = tuple(rng.sample(ptype.attributes, k=rng.randint(2, min(4, len(ptype.attributes)))))
    options = {}
    for name, pool in ptype.options.items():
        count = rng.randint(min(2, len(pool)), min(4, len(pool)))
        options[name] = tuple(sorted(rng.sample(pool, k=count), key=pool.index))
    assert not {v for vals in options.values() for v in vals} & _RESERVED_CLICKS
    low, high = ptype.price
    price = max(round(rng.uniform(low, high)) - 0.01, 0.99)
    title = f"{brand} {' '.join(adjectives)} {ptype.name} with {material}".replace("  ", " ")
    title = title[0].upper() + title[1:]
    features = tuple(f"{attr.capitalize()}: designed to be {attr}." for attr in attributes)
    description = (
        f"This {' '.join(adjectives)} {ptype.name} from {brand} is made with {material}. "
        f"It is a great choice for everyday use and makes a thoughtful gift."
    )
    nouns = frozenset((brand.lower(), *ptype.nouns, *material.split()))
    return Product(asin, title, ptype.name, ptype.category, ptype.query, attributes, options, price, description,
                   features, nouns)


_HEADS = (
    "i need {article} {ptype} that is {attrs}",
    "i am looking for {article} {ptype} which is {attrs}",
    "find me {article} {ptype} that is {attrs}",
    "i want to buy {article} {ptype}, {attrs}",
    "show me {article} {ptype} that is {attrs}",
)


def make_goal(product: Product, rng: random.Random) -> Goal:
    """WebShop-style synthetic goal for ``product``: some attributes, one value per option, a price bound."""
    attributes = tuple(rng.sample(product.attributes, k=rng.randint(1, min(3, len(product.attributes)))))
    options = {name: rng.choice(values) for name, values in product.options.items()}
    above = [p for p in PRICE_RANGE if p > product.price][:4]
    price_upper = max(rng.sample(above, 2)) if len(above) >= 2 else NO_PRICE_BOUND
    head = rng.choice(_HEADS).format(article=_article(product.product_type), ptype=product.product_type,
                                     attrs=_join_and(attributes))
    option_text = " with " + ", and ".join(f"{k}: {v}" for k, v in options.items()) if options else ""
    price_text = f", and price lower than {price_upper:.2f} dollars" if price_upper < NO_PRICE_BOUND else ""
    return Goal(product.asin, head + option_text + price_text, attributes, options, price_upper, product.query,
                product.category, product.title_nouns)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join_and(items: tuple[str, ...]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ----------------------------------------------------------------------------- the reward


@dataclass(frozen=True)
class RewardBreakdown:
    """WebShop's reward and its parts (``get_reward(..., verbose=True)``)."""

    score: float
    r_type: float
    query_match: bool
    category_match: bool
    title_score: float
    attribute_matches: int
    option_matches: int
    price_ok: bool
    n_attributes: int
    n_options: int


def score_purchase(product: Product, chosen: dict[str, str], goal: Goal) -> RewardBreakdown:
    """WebShop's reward for buying ``product`` with options ``chosen`` under ``goal``.

    score = r_type · (matched goal attributes + matched chosen options + [price ≤ bound])
                   / (number of goal attributes + number of goal options + 1)
    with r_type from the query / category / title-noun overlap (:func:`type_reward`). Fuzzy
    matching stands in for WebShop's ``fuzz.token_set_ratio > 85``; colour normalisation is not
    needed because the synthetic colours are already canonical.
    """
    r_type, query_match, category_match, title_score = type_reward(product, goal)
    attribute_matches = sum(_attribute_matched(product, attr) for attr in goal.attributes)
    goal_values = list(goal.options.values())
    option_matches = sum(_option_matched(product, name, value, goal_values) for name, value in chosen.items())
    price_ok = product.price <= goal.price_upper
    denominator = len(goal.attributes) + len(goal.options) + 1
    score = (attribute_matches + option_matches + int(price_ok)) / denominator * r_type
    return RewardBreakdown(score, r_type, query_match, category_match, title_score, attribute_matches,
                           option_matches, price_ok, len(goal.attributes), len(goal.options))


def type_reward(product: Product, goal: Goal) -> tuple[float, bool, bool, float]:
    """1.0 for the right kind of product, 0.5 / 0.1 / 0.0 as the evidence for it weakens (WebShop's rule)."""
    query_match = product.query == goal.query
    category_match = len(_levels(product.category) & _levels(goal.category)) >= 2
    title_score = len(product.title_nouns & goal.title_nouns) / len(goal.title_nouns) if goal.title_nouns else 0.2
    r_type = 1.0
    if not (query_match or category_match or title_score > 0.2):
        r_type = 0.5
    if title_score < 0.1:
        r_type = 0.1
    if title_score == 0.0:
        r_type = 0.0
    return r_type, query_match, category_match, title_score


def _levels(category: str) -> set[str]:
    return {level.strip() for level in category.split("›")}


def _attribute_matched(product: Product, attribute: str) -> bool:
    if any(fuzzy_match(candidate, attribute) for candidate in product.attributes):
        return True
    return attribute in product.text()


def _option_matched(product: Product, name: str, value: str, goal_values: list[str]) -> bool:
    if name.lower() in EXACT_MATCH_OPTIONS:
        if value in goal_values:
            return True
    elif any(fuzzy_match(goal_value, value) for goal_value in goal_values):
        return True
    return value in product.text()


def fuzzy_match(a: str, b: str, threshold: float = 0.85) -> bool:
    """Token-set similarity above ``threshold``: the idea of thefuzz's token_set_ratio, written from scratch.

    Both strings become sets of alphanumeric tokens (punctuation splits, as thefuzz's default
    processor does); the shared part is compared with each side's full form,
    so one phrase contained in the other scores 1.0 and unrelated phrases score low.
    """
    ta, tb = set(re.findall(r"[a-z0-9]+", a.lower())), set(re.findall(r"[a-z0-9]+", b.lower()))
    if not ta or not tb:
        return False
    shared = " ".join(sorted(ta & tb))
    full_a = " ".join(x for x in (shared, " ".join(sorted(ta - tb))) if x)
    full_b = " ".join(x for x in (shared, " ".join(sorted(tb - ta))) if x)
    pairs = ((shared, full_a), (shared, full_b), (full_a, full_b)) if shared else ((full_a, full_b),)
    return max(SequenceMatcher(None, x, y).ratio() for x, y in pairs) > threshold
