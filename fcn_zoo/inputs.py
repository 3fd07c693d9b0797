"""What ``fcn-zoo predict`` is asked to segment: its INPUT arguments become an ordered list of sources, each
with the name its outputs get under ``--out``.

An INPUT is an image or video file, a folder (walked recursively, in name order, linked sub-folders too; hidden
files and folders skipped; files with an image suffix are taken, others only if their content is an image; videos by
suffix), a glob (``"photos/**/*.jpg"``, quoted so that the shell leaves it alone), or ``@list.txt``: a text
file of such inputs, one per line, relative to the list's folder (blank lines and ``#`` comments skipped).

Output names keep the inputs' folder structure: a file found in a folder INPUT (or by a glob) is named by
its path relative to that folder (or the glob's fixed part, or the folder holding both where a match climbs
above it with ``..``), without its suffix; a file named directly by its own name. Where two inputs would
share a name (``a/x.jpg`` and ``b/x.jpg`` given as two folders or two files), every input is named from the
deepest folder that holds them all instead (``a/x``, ``b/x``); where two would still share one (``x.jpg`` and
``x.png`` side by side), those keep their suffix (``x.jpg``, ``x.png``).
"""

from __future__ import annotations

import glob
import itertools
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .errors import FCNZooError, MissingFileError

__all__ = ["Source", "expand_inputs", "VIDEO_SUFFIXES"]

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm")
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Source:
    """One thing to segment: ``path`` (as given or found), ``name`` (``/``-separated, relative, no suffix: the
    outputs are ``--out/<name>.png`` and so on) and whether it is a video."""

    path: Path
    name: str
    video: bool
    suffixed: bool = False  # the name keeps the input's suffix (x.jpg and x.png side by side)

    @property
    def file_name(self) -> str:
        """:attr:`name` with the input's suffix (``a/x.jpg``): what ``summary.csv`` calls it."""
        return self.name if self.suffixed else self.name + self.path.suffix


@dataclass
class Expansion:
    sources: list[Source]
    skipped: list[Path]  # files in walked folders that are neither images nor videos


def expand_inputs(inputs: list[str], exclude: str | os.PathLike | None = None) -> Expansion:
    """The sources named by ``inputs``, in order, each once; raises :class:`FCNZooError` for a missing path,
    an empty glob, an unreadable list or an empty result (a missing file named in a list fails alone, later).
    Walks never enter the folder ``exclude`` (the output folder, which may sit inside an input folder: its
    masks are not inputs)."""
    found: list[tuple[Path, Path]] = []  # (file, anchor folder)
    skipped: list[Path] = []
    for text in inputs:
        _expand(text, Path.cwd(), found, skipped, lists=())
    if exclude is not None:
        excluded = os.path.realpath(exclude)
        outside = [(p, a) for p, a in found if not _inside(p, excluded)]
        if found and not outside:
            raise FCNZooError(f"{' '.join(inputs)}: every input lies inside --out {exclude}, whose files are outputs, "
                              "not inputs; pass an --out outside the inputs")
        found, skipped = outside, [p for p in skipped if not _inside(p, excluded)]
    unique: dict[str, tuple[Path, Path]] = {}
    for path, anchor in found:
        unique.setdefault(os.path.realpath(path), (path, anchor))
    if not unique:
        raise FCNZooError(f"{' '.join(inputs)}: no images or videos found")
    skipped = list({os.path.realpath(p): p for p in skipped}.values())  # a file two globs or walks met counts once
    return Expansion(_named(list(unique.values())), skipped)


def readable_images(inputs: list[str], flag: str, masks: str | os.PathLike | None = None) -> list:
    """The image files ``inputs`` name (videos left out), checked up to the first that opens as an image: one
    line when there is none. With ``masks``, ``(image, mask)`` pairs: each image's mask is ``masks/<name>.png``."""
    what = f"{flag} {' '.join(inputs)}"
    images = [source for source in expand_inputs(inputs).sources if not source.video]
    if not images:
        raise FCNZooError(f"{what}: no images, only videos; give images")
    first_error = None
    for source in images:
        try:
            with Image.open(source.path):
                break
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            first_error = first_error or f"{source.path}: {e}"
    else:
        raise FCNZooError(f"{what}: none of the {len(images)} images could be read ({first_error})")
    if masks is None:
        return [source.path for source in images]
    pairs = [(source.path, Path(masks) / f"{source.name}.png") for source in images]
    missing = [mask for _, mask in pairs if not mask.is_file()]
    if missing:
        raise FCNZooError(f"--validation-masks {masks}: {len(missing)} of the {len(pairs)} masks are missing, "
                          f"such as {missing[0]}; name each mask as its image is named, with .png")
    return pairs


def _expand(text: str, base: Path, found: list, skipped: list, lists: tuple) -> None:
    if not text.strip():  # an unset shell variable: not the current folder
        raise MissingFileError(f"{text!r}: an empty INPUT names no file or folder")
    if text.startswith("@"):
        _read_list(Path(base, text[1:]), found, skipped, lists)
        return
    path = Path(base, text)
    if path.is_dir():
        _walk(path, found, skipped)
    elif not path.exists() and _GLOB_CHARS & set(text):
        matches = sorted(glob.glob(str(path), recursive=True))
        if not matches:
            raise FCNZooError(f"{text}: no file matches this pattern")
        root = _glob_root(path)
        for match in matches:  # as a folder INPUT's files are: named from the glob's fixed part, by content
            match = Path(match)
            if _hidden(match.name):
                continue
            if match.is_dir():
                _walk(match, found, skipped, _holding(root, match))
            elif match.is_file() and (_is_video(match) or _is_image(match)):  # a named pipe is no input
                found.append((match, _holding(root, match.parent)))
            else:
                skipped.append(match)
    elif not path.exists() and not lists:  # named on the command line: a typo, told before anything loads
        raise MissingFileError(f"{text}: no such file or folder")
    else:
        found.append((path, path.parent))  # a missing file of a list fails when it is read, the others going on


def _read_list(path: Path, found: list, skipped: list, lists: tuple) -> None:
    if path.resolve() in lists:
        raise FCNZooError(f"@{path}: the list includes itself")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a byte-order mark (Notepad) is not a name
    except (OSError, UnicodeDecodeError) as e:
        raise FCNZooError(f"@{path}: cannot read this list of inputs ({e.__class__.__name__}: {e})") from e
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            _expand(line, path.parent, found, skipped, lists + (path.resolve(),))


def _walk(folder: Path, found: list, skipped: list, anchor: Path | None = None) -> None:
    """``folder``'s images and videos, named from ``anchor`` (default the folder itself). Linked sub-folders are
    walked too (each real folder once: a link to a folder above is no loop)."""
    walked = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in walked:
            dirs[:] = []
            continue
        walked.add(real)
        dirs[:] = sorted(d for d in dirs if not _hidden(d))
        for name in sorted(files):
            if _hidden(name):
                continue
            path = Path(root, name)
            if path.is_file() and (_is_video(path) or _is_image(path)):  # a named pipe or device is skipped
                found.append((path, anchor or folder))
            else:
                skipped.append(path)


def _named(found: list[tuple[Path, Path]]) -> list[Source]:
    anchored = [_relative(path, anchor) for path, anchor in found]
    anchors: dict[str, set[Path]] = {}
    for (_, anchor), stem in zip(found, map(_stem, anchored)):
        anchors.setdefault(stem, set()).add(anchor)
    if any(len(folders) > 1 for folders in anchors.values()):  # the same name from two folders
        try:  # name everything from the deepest folder that holds every input
            root = os.path.commonpath([os.path.abspath(anchor) for _, anchor in found])
            anchored = [_relative(path, Path(root)) for path, _ in found]
        except ValueError:  # different drives: the suffix rule below is all there is
            pass
    stems = [_stem(r) for r in anchored]
    counts = Counter(stems)
    return [
        Source(path, relative if counts[stem] > 1 else stem, _is_video(path), counts[stem] > 1)
        for (path, _), relative, stem in zip(found, anchored, stems)
    ]


def _relative(path: Path, anchor: Path) -> str:
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(anchor))).as_posix()


def _stem(relative: str) -> str:
    return relative.removesuffix(Path(relative).suffix)


def _inside(path: Path, folder: str) -> bool:
    return os.path.realpath(path).startswith(folder.rstrip(os.sep) + os.sep)


def _glob_root(pattern: Path) -> Path:
    """The folder a glob's matches are named from: its path up to the first part with a wildcard."""
    return Path(*itertools.takewhile(lambda part: not _GLOB_CHARS & set(part), pattern.parts))


def _holding(folder: Path, where: Path) -> Path:
    """``folder``, or where the folder ``where`` (a match's, or a matched folder) climbs out of it (a glob's ``..``
    after a wildcard, ``photos/*/../../x.jpg``), the deepest folder that holds both: a name never starts with ``..``."""
    folder_abs, parent = os.path.abspath(folder), os.path.abspath(where)
    try:
        common = os.path.commonpath([folder_abs, parent])
    except ValueError:  # different drives
        return Path(parent)
    return folder if common == folder_abs else Path(common)


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def _is_image(path: Path) -> bool:
    """A suffix of an image format PIL reads, or (for other names) content PIL recognises from its header."""
    if Image.registered_extensions().get(path.suffix.lower()) in Image.OPEN:
        return True
    try:
        with Image.open(path):
            return True
    except Exception:  # not an image, or unreadable: either way not taken from a folder
        return False
