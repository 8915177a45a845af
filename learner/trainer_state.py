"""The trainer's part of a checkpoint, as plain data the registry can store.

``Registry.publish(..., trainer_state=...)`` saves it next to the model and optimizer, and
``Registry.load_checkpoint`` reads it with ``torch.load(weights_only=True)``: so only tensors,
ints, floats, strings, lists and dicts, never pickled objects (a numpy Generator's state is a
dict of Python ints; the torch generator's is a uint8 tensor).
"""
from __future__ import annotations

import numpy as np
import torch

FORMAT = 1


def pack_state(*, gen: torch.Generator, rng: np.random.Generator, ret: tuple, ewma: dict,
               position: dict, train_steps: int, new_since_publish: int,
               imitation_optimizer: dict | None = None, anchor: dict | None = None) -> dict:
    mean, std, seen = ret
    return {"format": FORMAT, "torch_rng": gen.get_state().clone(),
            "numpy_rng": rng.bit_generator.state,
            "ret": [float(mean), float(std), bool(seen)], "ewma": ewma, "position": position,
            "train_steps": int(train_steps), "new_since_publish": int(new_since_publish),
            "imitation_optimizer": imitation_optimizer, "anchor": anchor}


def unpack_rng(state: dict, gen: torch.Generator, rng: np.random.Generator) -> None:
    if state.get("format") != FORMAT:
        raise ValueError(f"trainer checkpoint format {state.get('format')!r}, this learner reads "
                         f"{FORMAT}; start from a fresh registry or an older learner")
    gen.set_state(state["torch_rng"])
    if state["numpy_rng"].get("bit_generator") != type(rng.bit_generator).__name__:
        raise ValueError(f"trainer checkpoint holds a {state['numpy_rng'].get('bit_generator')} "
                         f"state; the trainer uses {type(rng.bit_generator).__name__}")
    rng.bit_generator.state = state["numpy_rng"]
