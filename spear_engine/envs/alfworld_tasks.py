"""Procedural ALFWorld problems: a room, its receptacles and objects, and a goal, from a seed.

The official ALFWorld games (3,553 train / 134 eval, made from ALFRED scenes) are downloaded from GitHub
releases and cannot be fetched here, so we generate problems of the same shape ourselves. A problem is
PDDL for the ``alfred`` domain shipped in the alfworld wheel: receptacles with their ALFRED classes and
locations, objects with their properties (pickupable / cleanable / heatable / coolable / toggleable), and
one of the six ALFWorld goal formulas. Entity ids use ALFRED's mangled form
(``Apple_bar__plus_01_dot_59_bar_...``), so alfworld's ``AlfredDemangler`` names them ``apple 1``.

This module is pure Python (no alfworld / textworld import), so the generator can be tested and used
anywhere; :mod:`spear_engine.envs.alfworld` plays the problems with TextWorld's PDDL engine.

Seeds: a problem is a pure function of ``(split, seed, task_types)``. The generator's RNG is seeded with a
SHA-256 of ``"alfworld/<split>/<seed>"``, so the train and eval splits draw from unrelated streams and the
same integer seed gives different problems in the two splits; :func:`problem_key` (room, placements, goal)
lets tests check that the sampled tasks never coincide.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

TASK_TYPES = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)
"""The six ALFWorld task types, in ALFWorld's order (its task_type ids 1..6)."""

TASK_TYPE_ALIASES = {
    "pick_and_place": "pick_and_place_simple",
    "look_at_obj": "look_at_obj_in_light",
    "pick_clean_then_place": "pick_clean_then_place_in_recep",
    "pick_heat_then_place": "pick_heat_then_place_in_recep",
    "pick_cool_then_place": "pick_cool_then_place_in_recep",
    "pick_two_obj": "pick_two_obj_and_place",
}

TEMPLATES = {
    "pick_and_place_simple": ("put a {obj} in {recep}", "put some {obj} on {recep}"),
    "look_at_obj_in_light": ("look at {obj} under the {toggle}", "examine the {obj} with the {toggle}"),
    "pick_clean_then_place_in_recep": ("put a clean {obj} in {recep}", "clean some {obj} and put it in {recep}"),
    "pick_heat_then_place_in_recep": ("put a hot {obj} in {recep}", "heat some {obj} and put it in {recep}"),
    "pick_cool_then_place_in_recep": ("put a cool {obj} in {recep}", "cool some {obj} and put it in {recep}"),
    "pick_two_obj_and_place": ("put two {obj} in {recep}", "find two {obj} and put them in {recep}"),
}
"""ALFWorld's templated goal sentences (the text after "Your task is to: ")."""

# --- object classes and their properties (ALFRED's semantics) ---------------------------------------

FOOD = ("Apple", "Bread", "Egg", "Lettuce", "Potato", "Tomato")
DISHES = ("Bowl", "Cup", "Mug", "Plate")
COOKWARE = ("Kettle", "Pan", "Pot")
UTENSILS = ("ButterKnife", "Fork", "Knife", "Ladle", "Spatula", "Spoon")
KITCHEN_MISC = ("DishSponge", "PepperShaker", "SaltShaker", "SoapBottle", "WineBottle")
SMALL_THINGS = ("AlarmClock", "CD", "CellPhone", "CreditCard", "KeyChain", "Pen", "Pencil", "RemoteControl", "Watch")
DECOR = ("Book", "Box", "Laptop", "Newspaper", "Pillow", "Statue", "Vase")
BATH = ("Candle", "Cloth", "HandTowel", "SoapBar", "SprayBottle", "ToiletPaper", "Towel")

HEATABLE = frozenset({"Apple", "Bread", "Cup", "Egg", "Mug", "Plate", "Potato", "Tomato"})
COOLABLE = frozenset({"Apple", "Bowl", "Bread", "Cup", "Egg", "Lettuce", "Mug", "Pan", "Plate", "Pot", "Potato",
                      "Tomato", "WineBottle"})
CLEANABLE = frozenset({"Apple", "Bowl", "ButterKnife", "Cloth", "Cup", "DishSponge", "Egg", "Fork", "Kettle",
                       "Knife", "Ladle", "Lettuce", "Mug", "Pan", "Plate", "Pot", "Potato", "SoapBar", "Spatula",
                       "Spoon", "Tomato"})
LAMP = "DeskLamp"
"""The toggleable light of look_at_obj_in_light tasks; it stands on a receptacle and cannot be picked up."""

# --- receptacle classes: openable, and which object classes they can hold (canContain) --------------

OPENABLE = frozenset({"Cabinet", "Drawer", "Fridge", "Microwave", "Safe"})

_TABLE_TOP = frozenset(DISHES + SMALL_THINGS + DECOR + ("Candle", "SoapBottle", "SprayBottle"))
ACCEPTS: dict[str, frozenset[str]] = {
    "ArmChair": frozenset(("Book", "Box", "CellPhone", "CreditCard", "KeyChain", "Laptop", "Newspaper",
                           "Pillow", "RemoteControl", "Watch")),
    "BathtubBasin": frozenset(("Cloth", "HandTowel", "SoapBar", "SoapBottle")),
    "Bed": frozenset(("Book", "CellPhone", "Laptop", "Pillow", "Newspaper", "RemoteControl")),
    "Cabinet": frozenset(DISHES + COOKWARE + KITCHEN_MISC + ("Ladle", "Spatula", "Book", "Box", "Vase", "Statue")
                         + BATH),
    "CoffeeMachine": frozenset(("Mug",)),
    "CoffeeTable": _TABLE_TOP,
    "CounterTop": frozenset(FOOD + DISHES + COOKWARE + UTENSILS + KITCHEN_MISC + BATH),
    "Desk": _TABLE_TOP,
    "DiningTable": frozenset(FOOD + DISHES + COOKWARE + UTENSILS + KITCHEN_MISC + SMALL_THINGS + DECOR),
    "Drawer": frozenset(UTENSILS + SMALL_THINGS + ("DishSponge", "PepperShaker", "SaltShaker", "Book", "Cloth",
                                                   "SoapBar", "ToiletPaper", "Candle")),
    "Dresser": _TABLE_TOP,
    "Fridge": frozenset(FOOD + DISHES + ("Pan", "Pot", "WineBottle")),
    "GarbageCan": frozenset((*FOOD, "DishSponge", "SoapBottle", "SoapBar", "Cloth", "CD", "Pen", "Pencil",
                             "Newspaper", "ToiletPaper", "SprayBottle", "CreditCard", "Candle")),
    "HandTowelHolder": frozenset(("HandTowel",)),
    "LaundryHamper": frozenset(("Cloth", "Towel", "HandTowel", "Pillow")),
    "Microwave": frozenset(("Apple", "Bread", "Egg", "Potato", "Tomato", "Cup", "Mug", "Plate", "Bowl")),
    "Ottoman": frozenset(("Book", "Box", "CellPhone", "KeyChain", "Laptop", "Newspaper", "Pillow",
                          "RemoteControl")),
    "Safe": frozenset(("CD", "CellPhone", "CreditCard", "KeyChain", "Statue", "Vase", "Watch")),
    "Shelf": frozenset(DISHES + KITCHEN_MISC + SMALL_THINGS + ("Book", "Statue", "Vase", "Candle", "SoapBar",
                                                               "SprayBottle", "ToiletPaper")),
    "SideTable": _TABLE_TOP,
    "SinkBasin": frozenset(CLEANABLE),
    "Sofa": frozenset(("Book", "Box", "CellPhone", "CreditCard", "KeyChain", "Laptop", "Newspaper", "Pillow",
                       "RemoteControl")),
    "StoveBurner": frozenset(COOKWARE),
    "TVStand": _TABLE_TOP,
    "Toilet": frozenset(("Candle", "Cloth", "SoapBar", "SoapBottle", "SprayBottle", "ToiletPaper")),
    "ToiletPaperHanger": frozenset(("ToiletPaper",)),
    "TowelHolder": frozenset(("Towel",)),
}

LAMP_STANDS = frozenset({"Desk", "Dresser", "SideTable"})
"""Receptacle classes a desk lamp can stand on."""


@dataclass(frozen=True)
class RoomSpec:
    """A room kind: receptacle classes with (min, max) counts, and the object classes found there."""

    name: str
    receptacles: dict[str, tuple[int, int]]
    objects: tuple[str, ...]


ROOMS: dict[str, RoomSpec] = {
    "kitchen": RoomSpec(
        "kitchen",
        {"Cabinet": (2, 6), "CounterTop": (1, 2), "Drawer": (1, 3), "Fridge": (1, 1), "Microwave": (1, 1),
         "SinkBasin": (1, 1), "StoveBurner": (2, 4), "GarbageCan": (1, 1), "DiningTable": (0, 1),
         "CoffeeMachine": (0, 1), "Shelf": (0, 2)},
        FOOD + DISHES + COOKWARE + UTENSILS + KITCHEN_MISC,
    ),
    "livingroom": RoomSpec(
        "livingroom",
        {"Sofa": (1, 1), "ArmChair": (0, 2), "CoffeeTable": (1, 1), "SideTable": (1, 2), "TVStand": (0, 1),
         "Drawer": (1, 3), "Cabinet": (0, 3), "Shelf": (0, 3), "GarbageCan": (1, 1), "Dresser": (0, 1),
         "Ottoman": (0, 1)},
        SMALL_THINGS + DECOR + ("Bowl", "Plate", "Candle", "SprayBottle"),
    ),
    "bedroom": RoomSpec(
        "bedroom",
        {"Bed": (1, 1), "Desk": (1, 1), "SideTable": (1, 2), "Dresser": (0, 1), "Drawer": (1, 4), "Shelf": (0, 3),
         "GarbageCan": (1, 1), "LaundryHamper": (0, 1), "Safe": (0, 1), "ArmChair": (0, 1)},
        SMALL_THINGS + DECOR + ("Mug", "Bowl", "Cloth"),
    ),
    "bathroom": RoomSpec(
        "bathroom",
        {"Toilet": (1, 1), "SinkBasin": (1, 2), "BathtubBasin": (0, 1), "CounterTop": (1, 1), "Cabinet": (1, 4),
         "Drawer": (0, 2), "TowelHolder": (0, 1), "HandTowelHolder": (0, 1), "ToiletPaperHanger": (1, 1),
         "GarbageCan": (1, 1), "Shelf": (0, 2)},
        (*BATH, "DishSponge", "SoapBottle", "SprayBottle", "Candle"),
    ),
}

TASK_ROOMS: dict[str, tuple[str, ...]] = {
    "pick_and_place_simple": ("kitchen", "livingroom", "bedroom", "bathroom"),
    "look_at_obj_in_light": ("livingroom", "bedroom"),
    "pick_clean_then_place_in_recep": ("kitchen", "bathroom"),
    "pick_heat_then_place_in_recep": ("kitchen",),
    "pick_cool_then_place_in_recep": ("kitchen",),
    "pick_two_obj_and_place": ("kitchen", "livingroom", "bedroom", "bathroom"),
}

APPLIANCE = {
    "pick_clean_then_place_in_recep": "SinkBasin",
    "pick_heat_then_place_in_recep": "Microwave",
    "pick_cool_then_place_in_recep": "Fridge",
}
"""The receptacle class whose action changes the object's state (never the goal receptacle)."""

PROPERTY = {
    "pick_clean_then_place_in_recep": CLEANABLE,
    "pick_heat_then_place_in_recep": HEATABLE,
    "pick_cool_then_place_in_recep": COOLABLE,
}

DOMAIN_OBJECT_CONSTANTS = frozenset({"Knife", "ButterKnife"})
DOMAIN_RECEPTACLE_CONSTANTS = frozenset({"SinkBasin", "Microwave", "Fridge"})
"""Types the ``alfred`` domain's actions name as constants (SliceObject, Clean/Heat/CoolObject)."""


@dataclass(frozen=True)
class Entity:
    """One receptacle or object instance: its ALFRED class and its mangled PDDL id."""

    cls: str
    pddl_id: str


@dataclass
class Problem:
    """A generated ALFWorld problem: everything needed to write its PDDL and to describe it."""

    task_type: str
    room: str
    task: str
    """The goal sentence, e.g. ``put a clean apple in fridge``."""
    goal_pddl: str
    receptacles: list[Entity]
    locations: dict[str, str]
    """receptacle id -> location id."""
    objects: list[Entity]
    placement: dict[str, str]
    """object id -> receptacle id it starts in."""
    start_location: str
    target: str
    """Object class to move (or to look at)."""
    destination: str
    """Receptacle class the target goes to (the lamp class for look_at_obj_in_light)."""
    extra: dict[str, str] = field(default_factory=dict)


class GenerationError(RuntimeError):
    """The sampled room cannot host the sampled task (the generator then redraws)."""


def normalize_task_types(task_types: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Validate task type names (full ALFWorld names, short aliases, or ALFWorld's ids 1..6)."""
    if not task_types:
        return TASK_TYPES
    out = []
    for t in task_types:
        if isinstance(t, int) or (isinstance(t, str) and t.isdigit()):
            idx = int(t)
            if not 1 <= idx <= len(TASK_TYPES):
                raise ValueError(f"ALFWorld task type id must be 1..6, got {t}")
            name = TASK_TYPES[idx - 1]
        else:
            name = TASK_TYPE_ALIASES.get(t, t)
        if name not in TASK_TYPES:
            raise ValueError(f"unknown ALFWorld task type '{t}'; expected one of {', '.join(TASK_TYPES)}")
        out.append(name)
    return tuple(dict.fromkeys(out))


def split_rng(split: str, seed: int) -> random.Random:
    """The generator's RNG for one (split, seed): a hash, so the two splits share no stream."""
    digest = hashlib.sha256(f"alfworld/{split}/{int(seed)}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def generate_problem(seed: int, split: str = "train", task_types: tuple[str, ...] = TASK_TYPES) -> Problem:
    """The problem for ``(split, seed)``; deterministic. Redraws (same RNG stream) if a room cannot host a task."""
    rng = split_rng(split, seed)
    task_types = normalize_task_types(task_types)
    task_type = rng.choice(task_types)
    for _ in range(100):
        try:
            return _generate(rng, task_type)
        except GenerationError:
            continue
    raise RuntimeError(f"could not generate an ALFWorld {task_type} problem for seed {seed}")  # pragma: no cover


# --- generation ----------------------------------------------------------------------------------------


class _Ids:
    """Unique ALFRED-style mangled ids from random 3-D positions."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    @staticmethod
    def _coord(value: float) -> str:
        sign = "_plus_" if value >= 0 else "_minus_"
        return sign + f"{abs(value):05.2f}".replace(".", "_dot_")

    def entity(self, cls: str) -> str:
        while True:
            pos = "_bar_".join(self._coord(self.rng.uniform(-4.0, 4.0)) for _ in range(3))
            if cls == "SinkBasin":
                ident = f"Sink_bar_{pos}_bar_SinkBasin"
            elif cls == "BathtubBasin":
                ident = f"Bathtub_bar_{pos}_bar_BathtubBasin"
            else:
                ident = f"{cls}_bar_{pos}"
            if ident.lower() not in self.used:
                self.used.add(ident.lower())
                return ident

    def location(self) -> str:
        while True:
            parts = [self.rng.randint(-9, 12), self.rng.randint(-9, 12), self.rng.randint(0, 3),
                     self.rng.choice((-30, -15, 0, 15, 30, 45, 60))]
            ident = "loc_bar_" + "_bar_".join(f"_minus_{-p}" if p < 0 else str(p) for p in parts)
            if ident.lower() not in self.used:
                self.used.add(ident.lower())
                return ident


def _sample_receptacles(rng: random.Random, spec: RoomSpec, required: set[str]) -> list[str]:
    classes = []
    for cls, (lo, hi) in spec.receptacles.items():
        count = rng.randint(max(lo, 1 if cls in required else 0), max(hi, 1 if cls in required else 0))
        classes.extend([cls] * count)
    return classes


def _holders(receptacles: list[Entity], obj_cls: str, exclude: set[str] = frozenset()) -> list[Entity]:
    return [r for r in receptacles if obj_cls in ACCEPTS[r.cls] and r.cls not in exclude]


def _choose_goal(rng: random.Random, task_type: str, spec: RoomSpec, receptacles: list[Entity]) -> tuple[str, str]:
    """(target object class, destination receptacle class) that the room can host."""
    present = {r.cls for r in receptacles}
    if task_type == "look_at_obj_in_light":
        candidates = [o for o in spec.objects if _holders(receptacles, o)]
        if not candidates:
            raise GenerationError("no object can be placed")
        return rng.choice(candidates), LAMP
    wanted = PROPERTY.get(task_type)
    appliance = APPLIANCE.get(task_type)
    pairs = []
    for obj in spec.objects:
        if wanted is not None and obj not in wanted:
            continue
        for dest in sorted(present):
            if dest == appliance or obj not in ACCEPTS[dest]:
                continue
            # the target must start somewhere that is not a goal receptacle
            if _holders(receptacles, obj, exclude={dest}):
                pairs.append((obj, dest))
    if not pairs:
        raise GenerationError(f"room cannot host {task_type}")
    return rng.choice(pairs)


def _generate(rng: random.Random, task_type: str) -> Problem:
    room = rng.choice(TASK_ROOMS[task_type])
    spec = ROOMS[room]
    required = {APPLIANCE[task_type]} if task_type in APPLIANCE else set()
    ids = _Ids(rng)
    classes = _sample_receptacles(rng, spec, required)
    lamp_holder = None
    if task_type == "look_at_obj_in_light":
        stands = [c for c in classes if c in LAMP_STANDS]
        if not stands:
            raise GenerationError("no lamp stand")
    receptacles = [Entity(cls, ids.entity(cls)) for cls in classes]
    locations = {r.pddl_id: ids.location() for r in receptacles}

    target, destination = _choose_goal(rng, task_type, spec, receptacles)
    objects: list[Entity] = []
    placement: dict[str, str] = {}

    def place(cls: str, holders: list[Entity]) -> None:
        obj = Entity(cls, ids.entity(cls))
        objects.append(obj)
        placement[obj.pddl_id] = rng.choice(holders).pddl_id

    if task_type == "look_at_obj_in_light":
        lamp_holder = rng.choice([r for r in receptacles if r.cls in LAMP_STANDS])
        place(LAMP, [lamp_holder])
    n_targets = rng.randint(2, 3) if task_type == "pick_two_obj_and_place" else rng.randint(1, 3)
    start_holders = _holders(receptacles, target, exclude={destination})
    for _ in range(n_targets):
        place(target, start_holders)

    distractors = [o for o in spec.objects if o != target and _holders(receptacles, o)]
    for cls in rng.sample(distractors, k=min(len(distractors), rng.randint(4, 9))):
        holders = _holders(receptacles, cls)
        for _ in range(rng.randint(1, 2)):
            place(cls, holders)

    template = rng.choice(TEMPLATES[task_type])
    task = template.format(obj=target.lower(), recep=destination.lower(), toggle=LAMP.lower())
    extra = {"lamp_receptacle": lamp_holder.pddl_id} if lamp_holder else {}
    return Problem(
        task_type=task_type, room=room, task=task, goal_pddl=goal_formula(task_type, target, destination),
        receptacles=receptacles, locations=locations, objects=objects, placement=placement,
        start_location=ids.location(), target=target, destination=destination, extra=extra,
    )


# --- PDDL --------------------------------------------------------------------------------------------


def goal_formula(task_type: str, target: str, destination: str) -> str:
    """The ALFWorld goal of a task type, as a PDDL ``(:goal ...)`` block."""
    obj_t, rec_t = f"{target}Type", f"{destination}Type"
    if task_type == "look_at_obj_in_light":
        return (
            "(:goal (and\n"
            f"  (exists (?ot - object ?r - receptacle ?a - agent ?l - location)\n"
            f"    (and (objectType ?ot {rec_t}) (toggleable ?ot) (isToggled ?ot)\n"
            "         (receptacleAtLocation ?r ?l) (atLocation ?a ?l) (inReceptacle ?ot ?r)))\n"
            f"  (exists (?o - object ?a - agent) (and (objectType ?o {obj_t}) (holds ?a ?o)))))"
        )
    if task_type == "pick_two_obj_and_place":
        return (
            "(:goal (exists (?r - receptacle ?o1 - object ?o2 - object)\n"
            f"  (and (receptacleType ?r {rec_t}) (objectType ?o1 {obj_t}) (objectType ?o2 {obj_t})\n"
            "       (not (= ?o1 ?o2)) (inReceptacle ?o1 ?r) (inReceptacle ?o2 ?r))))"
        )
    state = {
        "pick_clean_then_place_in_recep": "(cleanable ?o) (isClean ?o) ",
        "pick_heat_then_place_in_recep": "(heatable ?o) (isHot ?o) ",
        "pick_cool_then_place_in_recep": "(coolable ?o) (isCool ?o) ",
    }.get(task_type, "")
    return (
        "(:goal (exists (?r - receptacle ?o - object)\n"
        f"  (and (objectType ?o {obj_t}) (receptacleType ?r {rec_t}) {state}(inReceptacle ?o ?r))))"
    )


def problem_pddl(problem: Problem, name: str = "spear_alfworld") -> str:
    """The PDDL problem text for the ``alfred`` domain."""
    # Only the types in play (plus the constants the domain's actions name) are declared: every extra
    # type and canContain fact makes fast-downward's grounding slower.
    object_classes = sorted({o.cls for o in problem.objects} | DOMAIN_OBJECT_CONSTANTS)
    receptacle_classes = sorted({r.cls for r in problem.receptacles} | DOMAIN_RECEPTACLE_CONSTANTS)
    objects = ["agent1 - agent"]
    objects += [f"{c}Type - otype" for c in object_classes]
    objects += [f"{c}Type - rtype" for c in receptacle_classes]
    objects += [f"{o.pddl_id} - object" for o in problem.objects]
    objects += [f"{r.pddl_id} - receptacle" for r in problem.receptacles]
    objects += [f"{loc} - location" for loc in [problem.start_location, *problem.locations.values()]]

    init = [f"(atLocation agent1 {problem.start_location})"]
    present_objects = {o.cls for o in problem.objects}
    for rcls in sorted({r.cls for r in problem.receptacles}):
        init += [f"(canContain {rcls}Type {ocls}Type)" for ocls in sorted(ACCEPTS[rcls] & present_objects)]
    for r in problem.receptacles:
        init.append(f"(receptacleType {r.pddl_id} {r.cls}Type)")
        init.append(f"(receptacleAtLocation {r.pddl_id} {problem.locations[r.pddl_id]})")
        if r.cls in OPENABLE:
            init.append(f"(openable {r.pddl_id})")
    for o in problem.objects:
        holder = problem.placement[o.pddl_id]
        init.append(f"(objectType {o.pddl_id} {o.cls}Type)")
        init.append(f"(inReceptacle {o.pddl_id} {holder})")
        init.append(f"(objectAtLocation {o.pddl_id} {problem.locations[holder]})")
        init += [f"({prop} {o.pddl_id})" for prop in object_properties(o.cls)]
    lines = "\n        ".join
    return (
        f"(define (problem {name})\n(:domain alfred)\n(:objects\n        {lines(objects)}\n)\n"
        f"(:init\n        {lines(init)}\n)\n{problem.goal_pddl}\n)\n"
    )


def object_properties(cls: str) -> list[str]:
    """The static PDDL properties of an object class."""
    if cls == LAMP:
        return ["toggleable"]
    props = ["pickupable", "moveable"]
    props += [name for name, group in (("cleanable", CLEANABLE), ("heatable", HEATABLE), ("coolable", COOLABLE))
              if cls in group]
    return props


def problem_key(problem: Problem) -> tuple:
    """What makes a task distinct (goal, room layout, initial placements), independent of entity ids."""
    by_id = {r.pddl_id: r.cls for r in problem.receptacles}
    recs = tuple(sorted(r.cls for r in problem.receptacles))
    placed = tuple(sorted((o.cls, by_id[problem.placement[o.pddl_id]]) for o in problem.objects))
    return (problem.task_type, problem.task, problem.room, recs, placed)
