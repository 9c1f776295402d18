"""Class lists: each class has one or more names (synonyms), each name a separate text query."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ClassNamesError


@dataclass(frozen=True)
class ClassList:
    """Classes in label order; ``names[c]`` holds the query names of class ``c``."""

    names: tuple[tuple[str, ...], ...]

    def __len__(self) -> int:
        return len(self.names)

    @property
    def display_names(self) -> tuple[str, ...]:
        """One name per class (its first), for legends and tables."""
        return tuple(n[0] for n in self.names)

    @property
    def queries(self) -> tuple[str, ...]:
        """All names, class by class: the text queries sent to CLIP."""
        return tuple(q for names in self.names for q in names)


def make_class_list(classes: ClassList | Sequence[str | Sequence[str]], unique: bool = True) -> ClassList:
    """Validate classes given as names or sequences of synonyms.

    A string item is one class; "cat; kitten" in a string is split into synonyms.

    ``unique=False`` lets a name repeat across classes, as some published class-name files do
    (COCO-Object queries "bed" for the background and for class "bed"; a tie goes to the lower
    class index, as in the published runs).

    Raises:
        ClassNamesError: no classes, an empty name, or (``unique``) a name used twice.
    """
    if isinstance(classes, ClassList):
        return classes
    if isinstance(classes, str):
        raise ClassNamesError("classes must be a list of names, not one string; use parse_classes() for 'a, b, c'")
    result: list[tuple[str, ...]] = []
    seen: dict[str, int] = {}
    for c, item in enumerate(classes):
        raw = item.split(";") if isinstance(item, str) else list(item)
        names = tuple(" ".join(str(n).split()) for n in raw)
        if not names or any(not n for n in names):
            raise ClassNamesError(f"class {c + 1} ({item!r}) has an empty name; remove it or give it a name")
        for n in names if unique else ():
            if n.lower() in seen:
                raise ClassNamesError(f"the name {n!r} is given twice (classes {seen[n.lower()] + 1} and {c + 1}); each name may be used once")
            seen[n.lower()] = c
        result.append(names)
    if not result:
        raise ClassNamesError("no class names given; name at least one class, e.g. --classes 'cat, dog'")
    return ClassList(tuple(result))


def parse_classes(text: str) -> ClassList:
    """Parse "cat; kitten, dog, grass": classes separated by commas, synonyms by semicolons."""
    if not text.strip():
        raise ClassNamesError("no class names given; name at least one class, e.g. --classes 'cat, dog'")
    return make_class_list(text.split(","))


def read_class_file(path: str | Path, unique: bool = True) -> ClassList:
    """Read a class-names file: one class a line, synonyms separated by "; " (blank lines skipped);
    ``unique``: see :func:`make_class_list`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ClassNamesError(f"cannot read class-names file {path}: {exc}") from exc
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ClassNamesError(f"class-names file {path} is empty; write one class a line")
    return make_class_list(lines, unique)
