"""Noun and verb taxonomies: the classes EgoNCE's positives are made of, and tagging captions.

A taxonomy file is JSON, `{"nouns": {"class name": ["synonym", …], …}, "verbs": {…}}`. A class's
index is its position among the keys of its kind, in file order; each class name matches itself
as well as its synonyms. `Taxonomy.tag(text)` finds the classes a caption names: text, names and
synonyms are lower-cased and split into words at every character that is not a letter or digit
("Cutting-board" → cutting, board; "#C C picks" → c, c, picks), and a name or synonym matches where
all its words appear consecutively in the caption, whole words only ("pan" does not match "pancake";
"cutting board" matches as a phrase, not as two words anywhere). scripts/prepare_data.py
--taxonomy tags the captions that carry no tags and copies the taxonomy next to the shards
(`TAXONOMY_FILENAME`), where the training pipeline checks data.num_nouns / data.num_verbs against
it. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence

from data_pipelines import schema
from vatt_jax import cli

# The copy of the taxonomy a conversion writes beside its shards ({output_dir}/taxonomy.json).
TAXONOMY_FILENAME = 'taxonomy.json'
KINDS = ('nouns', 'verbs')
_WORD = re.compile(r'[^\W_]+')  # letters and digits (any script); everything else separates words


def words(text: str) -> tuple[str, ...]:
  """The lower-case words of `text`, split at every character that is not a letter or digit."""
  return tuple(_WORD.findall(text.lower()))


@dataclasses.dataclass(frozen=True)
class Taxonomy:
  """nouns / verbs: [(class name, synonyms)] in class-index order; path: the file read."""

  nouns: tuple[tuple[str, tuple[str, ...]], ...]
  verbs: tuple[tuple[str, tuple[str, ...]], ...]
  path: str = ''

  def __post_init__(self):
    # {first word: [(all words, class index)]} per kind, longest phrases first.
    index = {}
    for kind in KINDS:
      by_first: dict[str, list[tuple[tuple[str, ...], int]]] = {}
      for c, (name, synonyms) in enumerate(getattr(self, kind)):
        for phrase in {words(name), *(words(s) for s in synonyms)}:
          if phrase:
            by_first.setdefault(phrase[0], []).append((phrase, c))
      index[kind] = by_first
    object.__setattr__(self, '_index', index)

  @property
  def num_nouns(self) -> int:
    return len(self.nouns)

  @property
  def num_verbs(self) -> int:
    return len(self.verbs)

  def tag(self, text: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(noun class indices, verb class indices) named in `text`, each sorted and unique."""
    text_words = words(text)
    found = []
    for kind in KINDS:
      by_first = self._index[kind]
      classes = set()
      for i, word in enumerate(text_words):
        for phrase, c in by_first.get(word, ()):
          if text_words[i : i + len(phrase)] == phrase:
            classes.add(c)
      found.append(tuple(sorted(classes)))
    return found[0], found[1]

  def tag_captions(self, captions: Sequence[schema.Caption]) -> tuple[schema.Caption, ...]:
    """The captions with neither noun nor verb tags tagged from their text; tagged ones as given."""
    return tuple(
      dataclasses.replace(c, **dict(zip(('nouns', 'verbs'), self.tag(c.text), strict=True)))
      if not c.nouns and not c.verbs
      else c
      for c in captions
    )

  def to_json(self) -> dict:
    """The taxonomy as its file format (read_taxonomy reads it back to the same classes)."""
    return {kind: {name: list(syn) for name, syn in getattr(self, kind)} for kind in KINDS}


def _no_repeated_keys(pairs):
  keys = [key for key, _ in pairs]
  repeated = sorted({key for key in keys if keys.count(key) > 1})
  if repeated:
    raise ValueError(f'class {repeated[0]!r} appears twice')
  return dict(pairs)


def read_taxonomy(path: str) -> Taxonomy:
  """Reads a taxonomy file (format in the module docstring).

  Raises `cli.UserError`, one line naming the file and the culprit, when it cannot be read, is not
  JSON, lacks "nouns" or "verbs", or has a class whose synonyms are not a list of strings, a name
  or synonym without a letter or digit, or a class name twice in one kind.
  """
  try:
    with open(path, encoding='utf-8') as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise cli.UserError(f'taxonomy {path}: cannot be read ({e})') from None
  try:
    data = json.loads(text, object_pairs_hook=_no_repeated_keys)
  except ValueError as e:  # json.JSONDecodeError is a ValueError; so is a repeated class
    raise cli.UserError(f'taxonomy {path}: not a valid taxonomy file ({e})') from None
  if not isinstance(data, dict):
    raise cli.UserError(
      f'taxonomy {path}: expected a JSON object {{"nouns": {{…}}, "verbs": {{…}}}}, got '
      f'{type(data).__name__}'
    )
  kinds = {}
  for kind in KINDS:
    if kind not in data:
      raise cli.UserError(f'taxonomy {path}: missing {kind!r} (give an empty object for none)')
    classes = data[kind]
    if not isinstance(classes, dict):
      raise cli.UserError(
        f'taxonomy {path}: {kind!r} must map class names to lists of synonyms, got '
        f'{type(classes).__name__}'
      )
    parsed = []
    for name, synonyms in classes.items():
      where = f'taxonomy {path}: {kind}[{name!r}]'
      if not words(name):
        raise cli.UserError(f'{where}: the class name has no letter or digit to match')
      if not isinstance(synonyms, list) or not all(isinstance(s, str) for s in synonyms):
        raise cli.UserError(f'{where}: expected a list of synonym strings, got {synonyms!r}')
      empty = [s for s in synonyms if not words(s)]
      if empty:
        raise cli.UserError(f'{where}: synonym {empty[0]!r} has no letter or digit to match')
      parsed.append((name, tuple(synonyms)))
    kinds[kind] = tuple(parsed)
  return Taxonomy(kinds['nouns'], kinds['verbs'], os.fspath(path))


def stored_taxonomy(shard_dir: str) -> Taxonomy | None:
  """The taxonomy a conversion copied beside the shards in `shard_dir`, None when there is none."""
  path = os.path.join(shard_dir, TAXONOMY_FILENAME)
  return read_taxonomy(path) if os.path.exists(path) else None
