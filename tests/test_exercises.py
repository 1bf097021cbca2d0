"The exercises of chapters 3-5 and their checkers (cytoclr.exercises, nbs/13_exercises.ipynb)."
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cytoclr.exercises import (CHECKS, SOLUTIONS, SourceCode, check_all, check_effective_positives, check_spatial_nce,
                               check_uniform_cell_draw, show_source, solution_uniform_cell_draw, solution_weighted_nce,
                               solution_weights_and_positives)
from helpers import formula_nce, slow_spatial_nce

NBS = Path(__file__).resolve().parents[1] / "nbs"
CHAPTERS = {"uniform_cell_draw": "03_sampling", "weights_and_positives": "04_geodesic", "weighted_nce": "05_losses"}


def _assert_wrong(result, *words):
    ok, message = result
    assert ok is False and message.startswith("wrong: "), message
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"


# ---- every checker accepts its solution and reports a stub as not done ----------------------------------------------

@pytest.mark.parametrize("name", sorted(CHECKS))
def test_checker_accepts_its_solution(name):
    ok, message = CHECKS[name](SOLUTIONS[name])
    assert ok is True and message.startswith("correct: "), message


def test_check_all_runs_every_checker_on_the_solutions():
    results = check_all()
    assert set(results) == set(CHECKS) == set(SOLUTIONS) == set(CHAPTERS)
    assert all(ok for ok, _ in results.values()), results


def _raises(*args):
    raise NotImplementedError


def _ellipsis(*args):
    ...


def _crashes(*args):
    raise ValueError("boom")


@pytest.mark.parametrize("name", sorted(CHECKS))
@pytest.mark.parametrize("stub", [_raises, _ellipsis])
def test_a_stub_is_not_done_and_does_not_raise(name, stub):
    ok, message = CHECKS[name](stub)
    assert ok is False and message.startswith("not done yet: "), message


@pytest.mark.parametrize("name", sorted(CHECKS))
@pytest.mark.parametrize("answer", [_crashes, lambda *a: "a string", lambda *a: (1, 2, 3), lambda *a: (np.zeros(3), np.zeros(3))])
def test_a_broken_answer_is_wrong_and_does_not_raise(name, answer):
    ok, message = CHECKS[name](answer)
    assert ok is False and message.startswith("wrong: "), message


def test_a_crash_names_the_exception():
    _assert_wrong(check_spatial_nce(_crashes), "ValueError", "boom")


# ---- chapter 3: points per unit of area --------------------------------------------------------------------------------

def _cells(masks):
    flat = [np.flatnonzero(m) for m in masks]
    owner = np.concatenate([np.full(len(f), i) for i, f in enumerate(flat)])
    return flat, owner


def per_cell(masks, cell_mm, cell_px, n, rng):
    "Every cortex cell equally likely, whatever its area."
    flat, owner = _cells(masks)
    pick = rng.integers(0, len(owner), n)
    section = owner[pick]
    a, b = np.divmod(np.concatenate(flat)[pick], np.array([np.shape(m)[1] for m in masks])[section])
    return section, (np.stack([a, b], 1) + rng.random((n, 2))) * cell_px - 0.5


def per_side(masks, cell_mm, cell_px, n, rng):
    "Cells weighted by their side in mm instead of their area."
    return solution_uniform_cell_draw(masks, [math.sqrt(c) for c in cell_mm], cell_px, n, rng)


def cell_centres(masks, cell_mm, cell_px, n, rng):
    "Right cells, but every point at its cell's centre."
    section, rc = solution_uniform_cell_draw(masks, cell_mm, cell_px, n, rng)
    return section, (np.floor((rc + 0.5) / cell_px) + 0.5) * cell_px - 0.5


def no_half_pixel(masks, cell_mm, cell_px, n, rng):
    "Forgets that pixel i spans [i - 0.5, i + 0.5): half a pixel too far down and right."
    section, rc = solution_uniform_cell_draw(masks, cell_mm, cell_px, n, rng)
    return section, rc + 0.5


def global_random(masks, cell_mm, cell_px, n, rng):
    "Ignores rng (np.random's global state changes between calls)."
    return solution_uniform_cell_draw(masks, cell_mm, cell_px, n, np.random.default_rng(np.random.randint(1 << 30)))


def test_points_drawn_per_cell_instead_of_per_area_are_wrong():
    _assert_wrong(check_uniform_cell_draw(per_cell), "area", "per cortex cell")


def test_cells_weighted_by_their_side_are_wrong():
    _assert_wrong(check_uniform_cell_draw(per_side), "cell_mm**2")


def test_points_at_cell_centres_are_wrong():
    _assert_wrong(check_uniform_cell_draw(cell_centres), "uniform", "snapped")


def test_the_pixel_convention_is_checked():
    _assert_wrong(check_uniform_cell_draw(no_half_pixel), "i - 0.5")


def test_randomness_must_come_from_rng():
    _assert_wrong(check_uniform_cell_draw(global_random), "rng")


def test_chapter_3_check_is_statistical_not_exact():
    "Another correct algorithm (cells drawn directly with probability ~ area) passes, although its numbers differ."
    def direct(masks, cell_mm, cell_px, n, rng):
        flat, owner = _cells(masks)
        p = np.asarray(cell_mm, float)[owner] ** 2
        pick = rng.choice(len(owner), n, p=p / p.sum())
        section = owner[pick]
        a, b = np.divmod(np.concatenate(flat)[pick], np.array([np.shape(m)[1] for m in masks])[section])
        return section, (np.stack([a, b], 1) + rng.random((n, 2))) * cell_px - 0.5
    ok, message = check_uniform_cell_draw(direct)
    assert ok, message


# ---- chapter 4: weights and effective positives --------------------------------------------------------------------

def diagonal_kept(d, s):
    w = np.exp(-np.asarray(d, float) ** 2 / (2 * s ** 2))
    return w, w.sum(1)


def no_two(d, s):
    w = np.exp(-np.asarray(d, float) ** 2 / s ** 2)
    np.fill_diagonal(w, 0)
    return w, w.sum(1)


def counts_itself(d, s):
    w, eff = solution_weights_and_positives(d, s)
    return w, eff + 1


def in_place(d, s):
    d[np.isinf(d)] = 1e6  # "avoid inf", written into the caller's matrix (the weights stay right)
    return solution_weights_and_positives(d, s)


def nan_from_inf(d, s):
    d = np.asarray(d, float)
    with np.errstate(invalid="ignore"):
        w = np.exp(-(d ** 2 - d ** 2 + d ** 2) / (2 * s ** 2))  # inf - inf = NaN
    np.fill_diagonal(w, 0)
    return w, w.sum(1)


def test_weights_with_the_diagonal_kept_are_wrong():
    _assert_wrong(check_effective_positives(diagonal_kept), "diagonal", "own positive")


def test_a_gaussian_without_the_two_is_wrong():
    _assert_wrong(check_effective_positives(no_two), "2 * sigma**2")


def test_effective_positives_counting_the_sample_itself_are_wrong():
    _assert_wrong(check_effective_positives(counts_itself), "itself")


def test_changing_the_distances_in_place_is_wrong():
    _assert_wrong(check_effective_positives(in_place), "in place")


def test_nan_from_infinite_distances_is_wrong():
    _assert_wrong(check_effective_positives(nan_from_inf), "NaN", "inf")


def test_torch_answers_are_accepted():
    def torch_answer(d, s):
        w = torch.exp(-torch.as_tensor(d, dtype=torch.float64) ** 2 / (2 * s ** 2)).fill_diagonal_(0)
        return w, w.sum(1)
    ok, message = check_effective_positives(torch_answer)
    assert ok, message


# ---- chapter 5: the loss -------------------------------------------------------------------------------------------

def no_minus(z, w, tau):
    return -solution_weighted_nce(z, w, tau)


def all_rows(z, w, tau):
    "Rows without positives counted as zeros in the mean."
    return formula_nce(z.double(), w.double(), tau, all_rows=True)


def self_in_denominator(z, w, tau):
    return formula_nce(z.double(), w.double(), tau, self_in_denominator=True)


def unnormalised(z, w, tau):
    "The formula with raw dot products instead of cosines."
    return formula_nce(z.double(), w.double(), tau, normalise=False)


def test_the_formula_in_tensor_operations_is_correct():
    ok, message = check_spatial_nce(lambda z, w, tau: formula_nce(z.double(), w.double(), tau))
    assert ok, message


def weights_in_place(z, w, tau):
    w.fill_diagonal_(0)  # modifies the caller's matrix
    return solution_weighted_nce(z, w, tau)


def test_a_loss_without_the_minus_sign_is_wrong():
    _assert_wrong(check_spatial_nce(no_minus), "minus")


def test_rows_without_positives_must_be_left_out():
    _assert_wrong(check_spatial_nce(all_rows), "rows without positives")


def test_the_denominator_excludes_the_sample_itself():
    _assert_wrong(check_spatial_nce(self_in_denominator), "k != i")


def test_embeddings_must_be_normalised():
    _assert_wrong(check_spatial_nce(unnormalised), "normalise")


def test_weights_must_not_change_in_place():
    _assert_wrong(check_spatial_nce(weights_in_place), "in place")


def test_a_loop_from_the_formula_is_correct():
    ok, message = check_spatial_nce(slow_spatial_nce)  # a student's loop, straight from the formula
    assert ok, message


def test_a_non_scalar_loss_is_wrong():
    _assert_wrong(check_spatial_nce(lambda z, w, t: torch.zeros(len(z))), "one number")


# ---- the chapters hold the exercises -------------------------------------------------------------------------------

def _cells_of(chapter):
    return json.loads((NBS / f"{chapter}.ipynb").read_text())["cells"]


def _exercise_cells(name):
    "The statement, stub, hidden-solution and check cells of an exercise in its chapter."
    cells = _cells_of(CHAPTERS[name])
    (i,) = [k for k, c in enumerate(cells) if "".join(c["source"]).startswith("### Exercise:") and c["cell_type"] == "markdown"]
    return cells[i:i + 4]


@pytest.mark.parametrize("name", sorted(CHAPTERS))
def test_chapter_has_statement_stub_hidden_solution_and_check(name):
    _, stub, solution, check = _exercise_cells(name)
    assert f"def {name}(" in "".join(stub["source"]) and "NotImplementedError" in "".join(stub["source"])
    assert {"hide-input", "hide-output"} <= set(solution["metadata"].get("tags", []))  # handouts drop hide-input cells
    assert f"show_source(solution_{name})" in "".join(solution["source"])
    assert CHECKS[name].__name__ in "".join(check["source"])
    for c in (stub, solution, check):
        assert not "".join(c["source"]).lstrip().startswith("#| export"), "exercise cells must not change the module"


@pytest.mark.parametrize("name", sorted(CHAPTERS))
def test_a_solution_is_written_once_in_the_module_and_shown_in_its_chapter(name):
    "The chapter imports the module's solution and shows its source: no second copy that could drift."
    assert not any(f"def solution_{name}(" in "".join(c["source"]) for c in _cells_of(CHAPTERS[name]))
    _, stub, solution, _ = _exercise_cells(name)
    ns = {"np": np, "torch": torch, "F": F, "math": math}
    exec("".join(stub["source"]), ns)
    ok, message = CHECKS[name](ns[name])
    assert not ok and message.startswith("not done yet: "), message
    lines = "".join(solution["source"]).strip().splitlines()
    exec("\n".join(lines[:-1]), ns)  # the import; the last line is the displayed expression
    shown = eval(lines[-1], ns)
    assert ns[f"solution_{name}"] is SOLUTIONS[name]
    assert isinstance(shown, SourceCode) and shown == show_source(SOLUTIONS[name])
    assert shown.startswith(f"def solution_{name}(") and shown._repr_markdown_() == f"```python\n{shown}```"


def test_show_source_displays_a_code_block():
    def f(x):
        return x + 1
    shown = show_source(f)
    assert shown == "    def f(x):\n        return x + 1\n" and repr(shown) == shown
    assert shown._repr_markdown_() == "```python\n    def f(x):\n        return x + 1\n```"
