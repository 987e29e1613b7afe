"""The fix, verified: the smallest request change whose render passes, found by rendering candidates."""

from __future__ import annotations

from PIL import Image

from parity.prescription import candidates, prescribe
from test_recipe import recipes


def server_like():
    _, training, reference = recipes("tiny_qwen_edit_plus_parity_a")[6]  # guidance 3 (ish), a LoRA at 0.6
    return reference


def synthetic(level_of):
    made = []

    def render(recipe):
        made.append(recipe)
        return Image.new("RGB", (8, 8), (level_of(recipe),) * 3)

    return render, made


def test_the_request_as_written_is_kept_when_it_passes():
    render, made = synthetic(lambda r: 0)
    fix = prescribe(render, lambda im: im.getpixel((0, 0))[0], lambda im: im.getpixel((0, 0))[0] <= 2, server_like())
    assert fix.passes and not fix.changes and fix.renders == 1 and len(made) == 1
    assert fix.describe() == "the request as written passes the thresholds"


def test_the_first_passing_candidate_is_the_fix_in_request_field_names():
    server = server_like()
    target = round(server.guidance * 1.5, 3)
    render, made = synthetic(lambda r: 0 if r.guidance == target else 40)
    fix = prescribe(render, lambda im: im.getpixel((0, 0))[0], lambda im: im.getpixel((0, 0))[0] <= 2, server)
    assert fix.passes and fix.changes == {"guidance_scale": target} and fix.distance == 0
    assert fix.renders == 3  # as written, x1.25, x1.5
    assert fix.describe().startswith(f"guidance_scale {target:g}: passes")


def test_no_passing_candidate_gives_the_closest_and_says_so():
    server = server_like()
    render, _ = synthetic(lambda r: 20 if r.multiplier != server.multiplier else 30)
    fix = prescribe(render, lambda im: im.getpixel((0, 0))[0], lambda im: False, server)
    assert not fix.passes and fix.distance == 20 and list(fix.changes) == ["network_multiplier"]
    assert "does not pass" in fix.describe()
    assert fix.renders == 1 + len(candidates(server))


def test_candidates_stay_in_the_servers_ranges_and_skip_the_multiplier_without_a_lora():
    server = server_like().with_fields(guidance=18.0)
    assert all(0 <= c.get("guidance", 0) <= 20 and -2 <= c.get("multiplier", 0) <= 2 for c in candidates(server))
    assert not any("multiplier" in c for c in candidates(server.with_fields(lora=None)))
