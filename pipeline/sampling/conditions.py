"""Conditions: what a user asks a conditional energy for, and the summed energy the sampler then runs.

    shape=ring                                     one attribute
    shape=ring AND background=checker              both (composition: the energies add)
    shape=ring AND NOT background=stripes          one, and not the other

Energies add (Du et al. 2020, "Compositional visual generation with energy based models"; Du et al. 2023, "Reduce,
Reuse, Recycle"): p(x | a, b) ~ p(x | a) p(x | b) / p(x), so with guidance weight w the sampler runs

    E = E_none + sum_k s_k w (E(c_k) - E_none),   s_k = +1 for a term, -1 for a NOT term,

where E(c_k) is the energy given term k's one field (every other field "not given") and E_none the unconditional
energy; the same network gives all of them (label dropout in training). w = 1 with one term is plain conditioning.
Each term is one `field=value`; a field may be any label the model was trained on (`label_vocabulary`). A NOT term
pushes away from what it names without bound (p(x) / p(x | b) keeps growing away from b), so it overshoots when b
is close to what is asked for; a lower guidance (or the MALA corrector) tempers it.

A generation run asks for one condition (`--condition`) or a mix (`--conditions FILE`: condition -> count, YAML or
JSON); image i's condition follows from the plan's order alone, so keys, seeds and counts stay exact on a resume.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..common.config import MAX_CONFIG_BYTES, ConfigError, EbdError, parse_yaml, quote

_AND = re.compile(r"\s+AND(?:\s+|$)", re.IGNORECASE)
_NOT = re.compile(r"^NOT\s+", re.IGNORECASE)


@dataclass(frozen=True)
class Term:
    field: str
    value: str
    negated: bool = False

    def __str__(self) -> str:
        return f"{'NOT ' if self.negated else ''}{self.field}={self.value}"


def parse_condition(text: str) -> tuple[Term, ...]:
    """`field=value [AND [NOT] field=value ...]` -> its terms (a syntax error is one line)."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("a condition must be a non-empty string such as 'shape=ring AND background=checker'")
    terms = []
    for part in _AND.split(text.strip()):
        negated = bool(_NOT.match(part))
        field, sep, value = _NOT.sub("", part).partition("=")
        if not sep or not field.strip() or not value.strip():
            raise ConfigError(f"condition {quote(text)}: {quote(part)} is not field=value (terms join with AND, "
                              "AND NOT)")
        terms.append(Term(field.strip(), value.strip(), negated))
    return tuple(terms)  # NOT terms alone are allowed: the unconditional energy pushed away from each


def canonical(text: str) -> str:
    """The condition as rows store it: terms as written, single spaces, upper-case AND / NOT."""
    return " AND ".join(map(str, parse_condition(text)))


def check_condition(terms: tuple[Term, ...], vocabulary: dict[str, list[str]], model_name: str = "the model") -> None:
    """Refuses (one line) a field or value the model was not trained on."""
    if not vocabulary:
        raise EbdError(f"{model_name} was trained without labels, so it takes no condition (train it with "
                       "condition_on: [FIELD, ...] on latents that carry those labels)")
    for term in terms:
        if term.field not in vocabulary:
            raise EbdError(f"unknown label field {term.field!r} in condition '{' AND '.join(map(str, terms))}': "
                           f"{model_name} knows {', '.join(vocabulary)}")
        if term.value not in vocabulary[term.field]:
            raise EbdError(f"unknown value {term.value!r} for {term.field}: {model_name} knows "
                           f"{', '.join(vocabulary[term.field])}")


# ------------------------------------------------------------------------------------------------ plans

def load_plan(condition: str | None, conditions: dict | str | None) -> list[list] | None:
    """[[condition, count], ...] in order, from one `condition` (count filled in by the caller) or a `conditions`
    mapping (or a YAML/JSON file of one); None when neither is given."""
    if condition is not None and conditions is not None:
        raise ConfigError("give condition or conditions, not both")
    if condition is not None:
        return [[canonical(condition), None]]
    if conditions is None:
        return None
    if isinstance(conditions, str):
        conditions = _read_mapping(Path(conditions))
    if not conditions:
        raise ConfigError("conditions must map at least one condition to a count")
    plan: dict[str, int] = {}
    for text, count in conditions.items():
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ConfigError(f"conditions: the count of {quote(text)} must be an integer >= 1, got {quote(count)}")
        key = canonical(str(text))
        if key in plan:
            raise ConfigError(f"conditions: {quote(key)} is listed twice")
        plan[key] = count
    return [[text, count] for text, count in plan.items()]


def _read_mapping(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"conditions file not found: {path}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"conditions file {path} is {path.stat().st_size:,} bytes, more than {MAX_CONFIG_BYTES:,}")
    data = parse_yaml(path.read_bytes(), f"conditions file {path}", MAX_CONFIG_BYTES)  # JSON is YAML
    if not isinstance(data, dict):
        raise ConfigError(f"conditions file {path} must map condition -> count")
    return data


def conditions_for(plan: list[list], start: int, count: int) -> list[str]:
    """The conditions of images [start, start + count): the plan's conditions in order, each for its count."""
    out, offset = [], 0
    for text, n in plan:
        lo, hi = max(start, offset), min(start + count, offset + n)
        out += [text] * max(0, hi - lo)
        offset += n
    return out


# ------------------------------------------------------------------------------------------------ energy

def encode(conditions: list[str], vocabulary: dict[str, list[str]], guidance: float):
    """Per chain: its terms' label rows (B x K x fields: a value's index + 1, 0 = not given) and their weights
    s_k w (B x K, 0 for padding), K the most terms any chain has."""
    fields = list(vocabulary)
    parsed = [parse_condition(text) for text in conditions]
    width = max(len(terms) for terms in parsed)
    labels = torch.zeros(len(parsed), width, len(fields), dtype=torch.long)
    weights = torch.zeros(len(parsed), width)
    for i, terms in enumerate(parsed):
        check_condition(terms, vocabulary)
        for k, term in enumerate(terms):
            labels[i, k, fields.index(term.field)] = vocabulary[term.field].index(term.value) + 1
            weights[i, k] = -guidance if term.negated else guidance
    return labels, weights


def conditioned_energy(model, conditions: list[str], guidance: float):
    """E(z, sigma) = (1 - sum_k s_k w) E_none + sum_k s_k w E(c_k), chain by chain, in one batched forward; the
    unconditional energy is left out when no chain needs it (one term at w = 1 is exactly E(c)). `model` may also
    output a noise prediction per chain (a score network): the same weighted sum is then classifier-free guidance
    (Ho & Salimans 2022) of its scores."""
    labels, weights = encode(conditions, model.label_vocabulary, guidance)
    null_weight = 1 - weights.sum(1)
    if bool((null_weight.abs() > 1e-9).any()):
        labels = torch.cat([torch.zeros_like(labels[:, :1]), labels], 1)
        weights = torch.cat([null_weight[:, None], weights], 1)
    chains, parts = labels.shape[:2]

    def energy(z: torch.Tensor, sigma) -> torch.Tensor:
        rows = labels.to(z.device).transpose(0, 1).reshape(parts * chains, -1)  # part-major: part k, then chain i
        out = model(z.repeat(parts, *[1] * (z.dim() - 1)), sigma, rows)
        out = out.view(parts, chains, *out.shape[1:])
        w = weights.to(z.device).T.reshape(parts, chains, *[1] * (out.dim() - 2))
        return (w * out).sum(0)

    return energy
