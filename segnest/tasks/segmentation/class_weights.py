"""Per-class loss weights for ``--class-weights auto|FILE``.

``auto`` uses ENet's rule (Paszke et al. 2016, also ERFNet's Cityscapes recipe):
``w_c = 1 / ln(1.02 + p_c)``, where ``p_c`` is class ``c``'s share of the labelled pixels
of the train masks (the label census, so it costs nothing once the census is cached).
It is chosen over median-frequency balancing (``median(f) / f_c``, SegNet) because it is
bounded: weights lie between ``1 / ln(2.02)`` ~ 1.4 and ``1 / ln(1.02)`` ~ 50, so a class
of a handful of pixels cannot outweigh the rest a thousandfold and destabilise SGD. The
weights are then scaled so that their mean over the classes present is 1, so the loss
keeps the scale the learning rate was tuned for. A class absent from the train masks gets
0: it never occurs in a target, so its weight has no effect; 0 says so.

``FILE``: one weight per class, in class order, as ``weight`` or ``name weight`` lines
(a name may hold spaces; blank lines and ``#`` comments skipped). ``class_weights.txt``,
which every weighted run writes into its work folder, is such a file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from segnest.errors import SegnestError
from segnest.runtime.files import write_text_atomic

AUTO = "auto"
FILE_NAME = "class_weights.txt"
# ENet's constant: p_c + 1.02 > 1 keeps the logarithm positive and bounds the weights.
ENET_C = 1.02


def auto_class_weights(train_id_counts: Mapping[int, int], num_classes: int) -> list[float]:
    """ENet weights from the train masks' pixels per train id (the module docstring)."""
    counts = [int(train_id_counts.get(c, 0)) for c in range(num_classes)]
    labelled = sum(counts)
    if labelled == 0:
        raise SegnestError("--class-weights auto: the train masks hold no labelled pixel")
    raw = [1.0 / math.log(ENET_C + n / labelled) if n else 0.0 for n in counts]
    present = [w for w, n in zip(raw, counts, strict=True) if n]
    mean = sum(present) / len(present)
    return [w / mean for w in raw]


def read_class_weights(path: str | Path, classes: Sequence[str]) -> list[float]:
    """The weights of ``path`` (module docstring), or a one-line SegnestError naming the
    file, the line and the fix."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SegnestError(f"--class-weights {path}: cannot read it ({err}); give a text file "
                           "with one weight per class, or 'auto'") from err
    weights: list[float] = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        where = f"--class-weights {path} line {number}"
        try:
            weight = float(words[-1])
        except ValueError:
            raise SegnestError(f"{where}: '{words[-1]}' is not a number") from None
        if not math.isfinite(weight) or weight < 0:
            raise SegnestError(f"{where}: weight {words[-1]} must be finite and >= 0")
        index = len(weights)
        name = " ".join(words[:-1])
        if name and index < len(classes) and name != " ".join(classes[index].split()):
            raise SegnestError(f"{where}: names class '{name}', but class {index} is "
                               f"'{classes[index]}'; list the classes in the dataset's order")
        weights.append(weight)
    if len(weights) != len(classes):
        raise SegnestError(f"--class-weights {path} holds {len(weights)} weight(s), the "
                           f"dataset has {len(classes)} classes; give one per class, in order")
    if not any(weights):
        raise SegnestError(f"--class-weights {path}: every weight is 0, nothing would be "
                           "learned; give at least one positive weight")
    return weights


def class_weights_for(setting: str | None, classes: Sequence[str],
                      train_id_counts: Mapping[int, int]) -> list[float] | None:
    """The weights ``--class-weights`` asks for (None without the flag)."""
    if setting is None:
        return None
    if setting == AUTO:
        return auto_class_weights(train_id_counts, len(classes))
    return read_class_weights(setting, classes)


def format_class_weights(weights: Sequence[float], classes: Sequence[str]) -> str:
    """``name weight`` lines that :func:`read_class_weights` reads back exactly."""
    return "".join(f"{name} {weight!r}\n" for name, weight in zip(classes, weights, strict=True))


def summary(weights: Sequence[float], classes: Sequence[str], setting: str) -> str:
    """The one line printed at start."""
    shown = ", ".join(f"{name} {weight:.3g}" for name, weight in zip(classes, weights,
                                                                         strict=True))
    return f"class weights ({'ENet rule' if setting == AUTO else setting}): {shown}"


def write_class_weights(work_dir: Path, weights: Sequence[float], classes: Sequence[str]) -> Path:
    path = work_dir / FILE_NAME
    write_text_atomic(path, format_class_weights(weights, classes))
    return path
