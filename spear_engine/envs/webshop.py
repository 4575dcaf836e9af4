"""WebShop-style shopping environment over a synthetic catalogue (text mode, WebShop's action grammar).

Pages and actions follow WebShop's text environment:
  search page   ``search[query]`` → results
  results page  ``click[<product id>]`` (or its title) → item, ``click[next >]``/``click[< prev]`` to
                page through ten results at a time (at most 50), ``click[back to search]``
  item page     ``click[<option value>]`` selects it, ``click[description]``/``click[features]``,
                ``click[< prev]`` back to the results, ``click[back to search]``, ``click[buy now]`` ends
  description / features page  ``click[< prev]`` back to the item, ``click[back to search]``
Observations are the page's elements joined by " [SEP] ", and ``admissible_actions`` lists what can
be clicked (the search page lists ``search[<your query>]``).

Reward: 0 per step; at ``buy now`` the episode ends and pays ``10 · score`` (verl-agent scales
WebShop's score by 10), where ``score`` is WebShop's reward (see
:func:`~spear_engine.envs.webshop_catalogue.score_purchase`); ``won`` is ``score == 1``. Reaching
``max_steps`` without buying ends the episode with reward 0 (``info["truncated"]``). An action that
is not ``kind="command"``, does not parse, or names something not on the page is invalid: the page
does not change, the step still counts.

Splits: the catalogue is shared; goals for ``train`` target 80% of the products and goals for
``eval`` the other 20%, and their random streams are seeded by (split, seed), so the two splits never
share a target product.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from spear_engine.envs.base import Action, ClosableEnv, Observation, StepResult, check_split, register_env
from spear_engine.envs.webshop_catalogue import (
    Catalogue,
    Goal,
    Product,
    RewardBreakdown,
    build_catalogue,
    make_goal,
    score_purchase,
)

REWARD_SCALE = 10.0
EVAL_EVERY = 5
"""Products whose index is a multiple of this are eval targets; the rest are train targets."""
PAGE_SIZE = 10
SEARCH_ACTION = "search[<your query>]"
_ACTION_RE = re.compile(r"^\s*(search|click)\s*\[(.*)\]\s*$", re.IGNORECASE | re.DOTALL)


@dataclass
class _State:
    page: str = "search"  # search | results | item | description | features
    query: str = ""
    results: list[str] = field(default_factory=list)
    page_num: int = 1
    asin: str | None = None
    chosen: dict[str, str] = field(default_factory=dict)


@register_env("webshop")
class WebShopEnv(ClosableEnv):
    """One shopper at a time over a catalogue built from ``catalogue_seed`` (shared, read-only)."""

    name = "webshop"

    def __init__(self, max_steps: int = 15, catalogue_seed: int = 0, num_products: int = 1200) -> None:
        self.max_steps = max_steps
        self.catalogue: Catalogue = build_catalogue(catalogue_seed, num_products)
        self._goal: Goal | None = None
        self._state = _State()
        self._steps = 0
        self._done = False

    # ------------------------------------------------------------------ protocol

    def reset(self, seed: int, split: str = "train") -> Observation:
        check_split(split)
        rng = random.Random(f"webshop-goal-{split}-{seed}")
        targets = self._targets(split)
        self._goal = make_goal(targets[rng.randrange(len(targets))], rng)
        self._state = _State()
        self._steps = 0
        self._done = False
        return self._observe()

    def step(self, action: Action) -> StepResult:
        if self._goal is None or self._done:
            raise RuntimeError("the episode is over (or never started): call reset()")
        self._steps += 1
        error = self._apply(action)
        if self._done:
            return self._buy_result()
        truncated = self._steps >= self.max_steps
        self._done = truncated
        info = {"page": self._state.page, "truncated": truncated}
        if error:
            info["error"] = error
        return StepResult(self._observe(), 0.0, truncated, False, error is None, info)

    def gold_actions(self) -> list[Action]:
        """From the episode's start: search with the instruction, page to the target, pick its options, buy."""
        goal = self._require_goal()
        query = goal.instruction
        ranking = self.catalogue.search(query)
        if goal.asin not in ranking:  # never seen in practice; the title always finds it
            query = self.catalogue.by_asin[goal.asin].title
            ranking = self.catalogue.search(query)
        position = ranking.index(goal.asin)
        actions = [f"search[{query}]"] + ["click[next >]"] * (position // PAGE_SIZE) + [f"click[{goal.asin.lower()}]"]
        actions += [f"click[{value}]" for value in goal.options.values()] + ["click[buy now]"]
        return [Action("command", text) for text in actions]

    def close(self) -> None:
        self._goal = None

    # ------------------------------------------------------------------ helpers for tests and tools

    @property
    def goal(self) -> Goal:
        return self._require_goal()

    def score(self, asin: str, chosen: dict[str, str]) -> RewardBreakdown:
        """WebShop's reward for buying ``asin`` with ``chosen`` options under the current goal."""
        return score_purchase(self.catalogue.by_asin[asin], chosen, self._require_goal())

    # ------------------------------------------------------------------ internals

    def _targets(self, split: str) -> list[Product]:
        products = self.catalogue.products
        in_eval = split == "eval"
        return [p for i, p in enumerate(products) if (i % EVAL_EVERY == 0) == in_eval]

    def _require_goal(self) -> Goal:
        if self._goal is None:
            raise RuntimeError("call reset() first")
        return self._goal

    def _apply(self, action: Action) -> str | None:
        """Change the page for a valid action; return why the action is invalid otherwise."""
        if action.kind != "command":
            return f"expected a command (search[...] or click[...]), got kind '{action.kind}'"
        match = _ACTION_RE.match(action.text)
        if not match:
            return "not an action: use search[query] or click[element]"
        verb, arg = match.group(1).lower(), " ".join(match.group(2).split())
        if verb == "search":
            return self._search(arg)
        return self._click(arg.lower())

    def _search(self, query: str) -> str | None:
        if self._state.page != "search":
            return "there is no search box on this page: click[back to search] first"
        if not query:
            return "empty search query"
        self._state = _State(page="results", query=query, results=self.catalogue.search(query))
        return None

    def _click(self, target: str) -> str | None:
        state = self._state
        if target == "back to search" and state.page != "search":
            self._state = _State()
            return None
        handler = {"results": self._click_results, "item": self._click_item}.get(state.page)
        if handler is not None:
            return handler(target)
        if state.page in ("description", "features") and target == "< prev":
            state.page = "item"
            return None
        return f"'{target}' is not clickable on this page"

    def _click_results(self, target: str) -> str | None:
        state = self._state
        last_page = max(1, -(-len(state.results) // PAGE_SIZE))
        if target == "next >" and state.page_num < last_page:
            state.page_num += 1
            return None
        if target == "< prev" and state.page_num > 1:
            state.page_num -= 1
            return None
        for asin in self._shown():
            product = self.catalogue.by_asin[asin]
            if target in (asin.lower(), product.title.lower()):
                state.page, state.asin, state.chosen = "item", asin, {}
                return None
        return f"'{target}' is not clickable on this page"

    def _click_item(self, target: str) -> str | None:
        state = self._state
        product = self.catalogue.by_asin[state.asin]
        if target == "< prev":
            state.page, state.asin, state.chosen = "results", None, {}
            return None
        if target in ("description", "features"):
            state.page = target
            return None
        if target == "buy now":
            self._done = True
            return None
        for name, values in product.options.items():
            if target in values:
                state.chosen[name] = target
                return None
        return f"'{target}' is not clickable on this page"

    def _buy_result(self) -> StepResult:
        state = self._state
        breakdown = score_purchase(self.catalogue.by_asin[state.asin], state.chosen, self._require_goal())
        won = breakdown.score >= 1.0 - 1e-9
        info = {"page": "done", "truncated": False, "score": breakdown.score, "reward_components": breakdown,
                "bought": state.asin, "chosen": dict(state.chosen)}
        text = f"Thank you for shopping with us! [SEP] Your score (min 0.0, max 1.0) [SEP] {breakdown.score:.4f}"
        obs = Observation(text, self._require_goal().instruction, [])
        return StepResult(obs, REWARD_SCALE * breakdown.score, True, won, True, info)

    def _shown(self) -> list[str]:
        start = (self._state.page_num - 1) * PAGE_SIZE
        return self._state.results[start : start + PAGE_SIZE]

    def _observe(self) -> Observation:
        goal = self._require_goal()
        elements, clickable = self._render()
        head = ["Instruction:", goal.instruction] if self._state.page != "search" else ["WebShop", "Instruction:", goal.instruction]
        return Observation(" [SEP] ".join(head + elements), goal.instruction, clickable)

    def _render(self) -> tuple[list[str], list[str]]:
        """The page's elements (text) and what can be clicked on it."""
        page = self._state.page
        if page == "search":
            return ["Search"], [SEARCH_ACTION]
        if page == "results":
            return self._render_results()
        product = self.catalogue.by_asin[self._state.asin]
        nav = ["Back to Search", "< Prev"]
        clicks = ["click[back to search]", "click[< prev]"]
        if page == "description":
            return [*nav, product.description], clicks
        if page == "features":
            return [*nav, *product.features], clicks
        return self._render_item(product, nav, clicks)

    def _render_results(self) -> tuple[list[str], list[str]]:
        state = self._state
        shown = self._shown()
        elements = ["Back to Search", f"Page {state.page_num} (Total results: {len(state.results)})"]
        clicks = ["click[back to search]"]
        if state.page_num > 1:
            elements.append("< Prev")
            clicks.append("click[< prev]")
        if state.page_num * PAGE_SIZE < len(state.results):
            elements.append("Next >")
            clicks.append("click[next >]")
        for asin in shown:
            product = self.catalogue.by_asin[asin]
            elements += [asin, product.title, f"${product.price:.2f}"]
            clicks.append(f"click[{asin.lower()}]")
        return elements, clicks

    def _render_item(self, product: Product, nav: list[str], clicks: list[str]) -> tuple[list[str], list[str]]:
        elements = list(nav)
        clicks = list(clicks)
        for name, values in product.options.items():
            elements.append(name)
            elements += values
            clicks += [f"click[{value}]" for value in values]
        elements += [product.title, f"Price: ${product.price:.2f}", "Rating: N.A.", "Description", "Features"]
        if self._state.chosen:
            elements.append("Selected: " + ", ".join(f"{k}: {v}" for k, v in self._state.chosen.items()))
        elements.append("Buy Now")
        clicks += ["click[description]", "click[features]", "click[buy now]"]
        return elements, clicks
