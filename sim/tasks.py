"""Meta-World v3 tasks by name: the language instruction a robot is given and the scripted
expert policy (a class in ``metaworld.policies``) that demonstrates it.

All 50 MT50 tasks are registered. Expert class names follow ``Sawyer<CamelName>Policy`` with
one historical exception (``peg-insert-side-v3`` -> ``SawyerPegInsertionSideV3Policy``).
"""
from __future__ import annotations

import dataclasses
import difflib


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    instruction: str
    expert: str  # class name in metaworld.policies

    def __post_init__(self):
        if not self.name.endswith("-v3") or not self.instruction.strip():
            raise ValueError(f"task {self.name!r}: need a '-v3' name and a non-empty instruction")


_INSTRUCTIONS = {
    "assembly-v3": "put the ring on the peg",
    "basketball-v3": "dunk the ball into the basket",
    "bin-picking-v3": "move the puck from one bin to the other",
    "box-close-v3": "put the lid on the box",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-topdown-wall-v3": "press the button from the top behind the wall",
    "button-press-v3": "press the button from the front",
    "button-press-wall-v3": "press the button from the front behind the wall",
    "coffee-button-v3": "press the button on the coffee machine",
    "coffee-pull-v3": "pull the mug out of the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "turn the dial",
    "disassemble-v3": "take the ring off the peg",
    "door-close-v3": "close the door",
    "door-lock-v3": "lock the door by turning the lock",
    "door-open-v3": "open the door",
    "door-unlock-v3": "unlock the door by turning the lock",
    "drawer-close-v3": "close the drawer",
    "drawer-open-v3": "open the drawer",
    "faucet-close-v3": "turn the faucet handle to close it",
    "faucet-open-v3": "turn the faucet handle to open it",
    "hammer-v3": "hammer the nail into the wall",
    "hand-insert-v3": "insert the hand into the hole",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "peg-unplug-side-v3": "unplug the peg from the side",
    "pick-out-of-hole-v3": "pick the puck out of the hole",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "pick-place-wall-v3": "pick up the puck and place it at the goal behind the wall",
    "plate-slide-back-side-v3": "slide the plate back into the cabinet from the side",
    "plate-slide-back-v3": "slide the plate back into the cabinet",
    "plate-slide-side-v3": "slide the plate sideways into the cabinet",
    "plate-slide-v3": "slide the plate into the cabinet",
    "push-back-v3": "push the puck back to the goal",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck to the goal around the wall",
    "reach-v3": "reach the goal position",
    "reach-wall-v3": "reach the goal position over the wall",
    "shelf-place-v3": "place the puck on the shelf",
    "soccer-v3": "kick the ball into the goal",
    "stick-pull-v3": "pull the box with the stick",
    "stick-push-v3": "push the box with the stick",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the table",
    "window-close-v3": "slide the window closed",
    "window-open-v3": "slide the window open",
}

_EXPERT_EXCEPTIONS = {"peg-insert-side-v3": "SawyerPegInsertionSideV3Policy"}


def _expert_name(task: str) -> str:
    if task in _EXPERT_EXCEPTIONS:
        return _EXPERT_EXCEPTIONS[task]
    return "Sawyer" + "".join(part.capitalize() for part in task.split("-")) + "Policy"


TASKS: dict[str, TaskSpec] = {
    name: TaskSpec(name, text, _expert_name(name)) for name, text in _INSTRUCTIONS.items()
}

# Chosen by measurement (default pretrain budget, 20 eval episodes each: reach 35%, push 10%,
# door-open 60%; drawer-close and button-press-topdown reach 90-100%): tasks where the pretrained
# policy succeeds sometimes but not always, so that online learning has room to show.
DEFAULT_TASKS: tuple[str, ...] = ("reach-v3", "push-v3", "door-open-v3")


def get_task(name: str) -> TaskSpec:
    """The registered task ``name``; an unknown name raises ValueError naming the nearest."""
    try:
        return TASKS[name]
    except KeyError:
        near = difflib.get_close_matches(name, TASKS, n=1, cutoff=0.0)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown Meta-World task {name!r}{hint} "
                         f"({len(TASKS)} tasks are registered in sim.tasks.TASKS)") from None


def instruction(name: str) -> str:
    return get_task(name).instruction


def expert_policy(name: str):
    """A fresh instance of the task's scripted expert (imports metaworld on use)."""
    import metaworld.policies as policies  # heavy; only when an expert is needed

    return getattr(policies, get_task(name).expert)()
