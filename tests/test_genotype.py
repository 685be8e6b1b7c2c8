"""graphopt/genotype.py: Site, Genotype and SearchSpace, the only things strategies see.

A genotype is what the run store keys candidates on (`to_json`) and what strategies put in
sets and dicts (`hash`, `==`): two genotypes with the same genes must be one candidate, in any
order of construction, in this process and the next.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from graphopt.genotype import Genotype, SearchSpace, Site


def _space() -> SearchSpace:
    return SearchSpace([
        Site("conv_bn:/bn1", "conv_bn", ("/conv1", "/bn1"), ("keep", "fuse"), exact_choice="fuse"),
        Site("width:/conv2", "width", ("/conv2",), (1.0, 0.75, 0.5)),
        Site("depthwise:/conv3", "depthwise", ("/conv3",), (0, 1, 2)),
        Site("int8:/fc", "int8", ("/fc",), (False, True)),
    ])


# ------------------------------------------------------------------------------ Genotype
def test_equal_genes_make_one_genotype_whatever_the_order():
    a = Genotype({"width:/conv2": 0.5, "conv_bn:/bn1": "fuse"})
    b = Genotype([("conv_bn:/bn1", "fuse"), ("width:/conv2", 0.5)])
    assert a == b and hash(a) == hash(b)
    assert len({a, b}) == 1 and {a: 1}[b] == 1
    assert list(a) == ["conv_bn:/bn1", "width:/conv2"]  # sorted by site key
    assert a.to_json() == b.to_json() == '{"conv_bn:/bn1":"fuse","width:/conv2":0.5}'


def test_different_genes_are_different_genotypes():
    a = Genotype({"width:/conv2": 0.5})
    assert a != Genotype({"width:/conv2": 0.75})
    assert a != Genotype({"width:/conv3": 0.5})
    assert a != Genotype({"width:/conv2": 0.5, "conv_bn:/bn1": "fuse"})
    assert Genotype() != Genotype({"conv_bn:/bn1": "fuse"})
    assert a != {"width:/conv2": 0.5}  # a plain dict is not a genotype (the store keys on Genotype only)
    assert len({Genotype(), a, Genotype({"width:/conv2": 0.75})}) == 3


def test_mapping_interface():
    g = Genotype({"width:/conv2": 0.5, "conv_bn:/bn1": "fuse"})
    assert g["width:/conv2"] == 0.5 and g.get("nope") is None and "conv_bn:/bn1" in g
    assert len(g) == 2 and dict(g) == {"conv_bn:/bn1": "fuse", "width:/conv2": 0.5}
    with pytest.raises(KeyError):
        g["width:/conv9"]
    assert not Genotype() and len(Genotype()) == 0


def test_json_round_trip_keeps_choice_types():
    g = Genotype({"width:/conv2": 0.5, "conv_bn:/bn1": "fuse", "depthwise:/conv3": 2, "int8:/fc": True})
    text = g.to_json()
    back = Genotype.from_json(text)
    assert back == g and hash(back) == hash(g) and back.to_json() == text
    assert type(back["depthwise:/conv3"]) is int and type(back["int8:/fc"]) is bool
    assert type(back["width:/conv2"]) is float
    assert json.loads(text) == dict(g)
    assert Genotype.from_json(Genotype().to_json()) == Genotype() and Genotype().to_json() == "{}"


def test_json_is_canonical_for_the_store():
    """The run store's UNIQUE key: no whitespace, keys sorted, non-ASCII escaped the same way every time."""
    g = Genotype({"width:/é/conv": 0.75, "conv_bn:/bn 1": "fuse"})
    assert g.to_json() == '{"conv_bn:/bn 1":"fuse","width:/\\u00e9/conv":0.75}'
    assert Genotype.from_json(g.to_json()) == g


def test_json_key_is_the_same_in_another_process():
    """A resumed run rebuilds genotypes from the store in another process: the JSON key (not hash(),
    which Python salts per process) must come out the same there, and compare equal here."""
    g = Genotype({"width:/conv2": 0.5, "conv_bn:/bn1": "fuse"})
    code = ("from graphopt.genotype import Genotype\n"
            "g = Genotype({'conv_bn:/bn1': 'fuse', 'width:/conv2': 0.5})\n"
            "print(g.to_json())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert Genotype.from_json(out) == g and out == g.to_json()


def test_genotype_is_immutable():
    g = Genotype({"width:/conv2": 0.5})
    with pytest.raises((AttributeError, TypeError)):
        g["width:/conv2"] = 0.75  # type: ignore[index]
    with pytest.raises(AttributeError):
        g.extra = 1  # type: ignore[attr-defined]
    genes = {"width:/conv2": 0.5}
    h = Genotype(genes)
    genes["width:/conv2"] = 0.75  # the caller's dict is copied
    assert h["width:/conv2"] == 0.5


def test_describe():
    assert Genotype().describe() == "original"
    g = Genotype({f"width:/c{i}": 0.5 for i in range(6)})
    assert g.describe() == "width:/c0=0.5, width:/c1=0.5, width:/c2=0.5, width:/c3=0.5 (+2 more)"
    assert Genotype({"conv_bn:/bn1": "fuse"}).describe() == "conv_bn:/bn1=fuse"


# ---------------------------------------------------------------------------------- Site
def test_site_needs_keep_and_a_choice_and_a_valid_exact_choice():
    s = Site("width:/c", "width", ("/c",), (1.0, 0.5))
    assert s.keep == 1.0
    with pytest.raises(ValueError, match="needs 'keep' plus at least one choice"):
        Site("width:/c", "width", ("/c",), (1.0,))
    with pytest.raises(ValueError, match="exact_choice 'fuse' not in choices"):
        Site("conv_bn:/b", "conv_bn", ("/b",), ("keep", "split"), exact_choice="fuse")
    with pytest.raises(ValueError, match="exact_choice 'keep' not in choices"):  # keep cannot be the exact move
        Site("conv_bn:/b", "conv_bn", ("/b",), ("keep", "fuse"), exact_choice="keep")


# --------------------------------------------------------------------------- SearchSpace
def test_keep_choices_are_dropped_so_keep_equals_the_original():
    space = _space()
    g = space.genotype({"conv_bn:/bn1": "keep", "width:/conv2": 1.0, "depthwise:/conv3": 0, "int8:/fc": False})
    assert g == Genotype() and g.to_json() == "{}"
    g = space.genotype({"conv_bn:/bn1": "fuse", "width:/conv2": 1.0, "depthwise:/conv3": 2})
    assert g == Genotype({"conv_bn:/bn1": "fuse", "depthwise:/conv3": 2})


def test_keep_is_the_site_s_first_choice_not_a_fixed_word():
    """A falsy non-keep choice (0 of a choice list that does not start with it) is a gene, not keep."""
    space = SearchSpace([Site("depthwise:/c", "depthwise", ("/c",), (2, 0, 1)),
                         Site("int8:/fc", "int8", ("/fc",), (True, False))])
    assert space.genotype({"depthwise:/c": 0, "int8:/fc": False}) == Genotype({"depthwise:/c": 0, "int8:/fc": False})
    assert space.genotype({"depthwise:/c": 2, "int8:/fc": True}) == Genotype()


def test_genotype_validation_names_the_problem():
    space = _space()
    with pytest.raises(ValueError, match=r"unknown site 'width:/conv9'"):
        space.genotype({"width:/conv9": 0.5})
    with pytest.raises(ValueError, match=r"site 'width:/conv2': choice 0.25 not in \(1.0, 0.75, 0.5\)"):
        space.genotype({"width:/conv2": 0.25})


def test_space_lookup_exact_genotype_size_and_by_pass():
    space = _space()
    assert len(space) == 4 and "width:/conv2" in space and "width:/conv9" not in space
    assert space.site("width:/conv2").choices == (1.0, 0.75, 0.5)
    assert space.exact_genotype() == Genotype({"conv_bn:/bn1": "fuse"})
    assert space.log10_size() == pytest.approx(math.log10(2 * 3 * 3 * 2))
    assert {k: [s.key for s in v] for k, v in space.by_pass().items()} == {
        "conv_bn": ["conv_bn:/bn1"], "width": ["width:/conv2"], "depthwise": ["depthwise:/conv3"], "int8": ["int8:/fc"]}
    assert SearchSpace().log10_size() == 0 and SearchSpace().exact_genotype() == Genotype()


def test_duplicate_site_keys_are_refused():
    s = Site("width:/c", "width", ("/c",), (1.0, 0.5))
    with pytest.raises(ValueError, match="duplicate site key 'width:/c'"):
        SearchSpace([s, s])
