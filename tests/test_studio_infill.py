"""Regenerate bars in the studio: the roll's JSON, the infill route and its checks, and the page (a drag across
the roll, then Regenerate) on a tiny random model whose tokenizer has the fill-in-the-middle tokens. Oracles:
the variation's own MIDI file (every note outside the span kept exactly) and the bar lines of midistral.music."""

import json
import time

import pytest
import symusic
import torch

from midistral import music
from midistral.errors import MidistralError
from midistral.studio.roll import Fresh, roll_data, span_ticks
from midistral.studio.settings import parse_infill
from test_studio import (CHROMIUM, SERVER_LOG, browser, form, http, page, prompt, server, set_value,  # noqa: F401
                         wait_for_variations)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A run folder: best/ holds a random tiny model whose tokenizer has the extra (infill, style) tokens."""
    from midistral.checkpoint import save_checkpoint
    from midistral.model import ModelConfig, Transformer
    from midistral.tokenize import REMI
    from midistral.tokenize.extra import ExtraVocab

    torch.manual_seed(0)
    tok = REMI()
    tok.extra = ExtraVocab(len(tok), styles=["bach", "folk"])
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, sliding_window=16, max_position_embeddings=1024)
    run = tmp_path_factory.mktemp("infill-run")
    save_checkpoint(run / "best", Transformer(cfg), tok)
    return run


def tune(bars=4):
    """`bars` bars of 4/4: piano quarter notes over a bass in half notes."""
    s = symusic.Score(480)
    s.time_signatures.append(symusic.TimeSignature(0, 4, 4))
    piano, bass = symusic.Track("p", 0, False), symusic.Track("b", 33, False)
    for beat in range(4 * bars):
        piano.notes.append(symusic.Note(beat * 480, 480, 60 + beat % 7, 80))
        if beat % 2 == 0:
            bass.notes.append(symusic.Note(beat * 480, 960, 36 + beat % 5, 70))
    s.tracks.extend([piano, bass])
    return s


# ---------------------------------------------------------------------------------------------------
# The roll's data and the form's checks, without a server


def test_roll_data_in_beats_with_bar_lines_and_new_notes():
    s = tune(4)
    lo, hi = span_ticks(s, 2, 3)
    assert (lo, hi) == (1920, 5760)
    roll = roll_data(s, Fresh(lo, hi, programs=(33,), bars=(2, 3)))
    assert roll["bars"] == [0.0, 4.0, 8.0, 12.0, 16.0] and roll["span"] == [2, 3]
    piano, bass = roll["tracks"]
    assert piano["program"] == 0 and not any(n[3] for n in piano["notes"])  # only the bass was regenerated
    assert [n[0] for n in bass["notes"] if n[3]] == [4.0, 6.0, 8.0, 10.0] and bass["notes"][0] == [0.0, 2.0, 36, 0]
    cont = roll_data(s, Fresh(3840))  # a continuation from bar 3
    assert {n[0] >= 8 for n in cont["tracks"][0]["notes"]} == {True, False}
    assert all(bool(n[3]) == (n[0] >= 8) for t in cont["tracks"] for n in t["notes"])
    added = roll_data(s, Fresh(track=1))
    assert [any(n[3] for n in t["notes"]) for t in added["tracks"]] == [False, True]
    assert json.loads(json.dumps(added)) == added


def test_roll_of_three_four_ends_its_last_bar():
    s = tune(2)
    s.time_signatures = [symusic.TimeSignature(0, 3, 4)]
    bars = roll_data(s, Fresh())["bars"]
    assert bars[:3] == [0.0, 3.0, 6.0] and bars[-1] - bars[-2] == 3.0 and len(bars) == music.n_bars(s) + 1


def check(fields, max_bars=8, styles=()):
    s = tune(4)
    return parse_infill(fields, s, b"midi", "tune.mid", "variation 1", max_bars, styles)


def test_infill_form_is_checked_in_one_line_each():
    r = check({"first": "2", "last": "3", "tracks": "33", "variations": "2", "seed": "5", "key": "D minor",
               "style": "folk"}, styles=["folk"])
    assert (r.mode, r.span, r.tracks, r.variations, r.seed, r.style, r.attributes) == (
        "infill", (2, 3), [33], 2, 5, "folk", {"key": "D minor"})
    assert check({"first": "1", "last": "4", "tracks": "0,33"}).tracks == [0, 33]
    assert check({"first": "4", "last": "4"}).tracks is None
    for fields, words in (
            ({"last": "3"}, "select the bars first (the first bar is missing)"),
            ({"first": "3", "last": "2"}, "bars 3-2: the first bar is after the last"),
            ({"first": "0", "last": "2"}, "the first bar must be between 1 and 4 (the variation's bars), got 0"),
            ({"first": "2", "last": "9"}, "the last bar must be between 1 and 4"),
            ({"first": "x", "last": "2"}, "'x' is not a whole number"),
            ({"first": "1", "last": "4", "tracks": "40"}, "Tracks: Violin does not play in variation 1"),
            ({"first": "1", "last": "2", "tracks": "300"}, "not an instrument number"),
            ({"first": "1", "last": "2", "temperature": "9"}, "between 0.0 and 2.0"),
            ({"first": "1", "last": "2", "style": "jazz"}, "Style: 'jazz' is not one the model knows"),
            ({"first": "1", "last": "2", "key": "H major"}, "Key"),
    ):
        with pytest.raises(MidistralError, match=None) as e:
            check(fields)
        assert words in str(e.value) and "\n" not in str(e.value), (fields, str(e.value))
    with pytest.raises(MidistralError, match="at most 2 bars at once"):
        check({"first": "1", "last": "3"}, max_bars=2)


# ---------------------------------------------------------------------------------------------------
# The server


def post(server, path, fields, file=None):
    body, headers = form(fields, file)
    return http(server, "POST", path, body, headers)


def wait_done(server, job_id, timeout=240):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        status, _, job = http(server, "GET", f"/api/jobs/{job_id}")
        if job["state"] in ("done", "failed"):
            return job
        time.sleep(0.2)
    raise AssertionError("the job did not finish")


def midi_of(server, path) -> symusic.Score:
    import urllib.request

    with urllib.request.urlopen(server.rstrip("/") + path) as r:
        return symusic.Score.from_midi(r.read())


def notes_outside(score: symusic.Score, lo: int, hi: int):
    return sorted((music.track_program(t), n.time, n.duration, n.pitch, n.velocity)
                  for t in score.tracks for n in t.notes if not lo <= n.time < hi)


@pytest.fixture(scope="module")
def continued(server, prompt):
    """A finished Continue job (2 variations of the 4-bar prompt + 2 bars)."""
    status, _, job = post(server, "/api/generate", {"mode": "continue", "bars": "2", "variations": "2", "seed": "3"},
                          ("tune.mid", prompt.read_bytes()))
    assert status == 202, job
    job = wait_done(server, job["id"])
    assert job["state"] == "done", job["error"]
    return job


def test_info_says_infill_is_possible(server):
    _, _, info = http(server, "GET", "/api/info")
    assert info["infill"] is True and info["infill_max_bars"] == 9  # 96 ids a bar + 64 within 1024 positions


def test_roll_json_marks_the_continuation_new(server, continued):
    _, _, roll = http(server, "GET", continued["variations"][0]["roll"])
    assert roll["bars"][:5] == [0.0, 4.0, 8.0, 12.0, 16.0] and roll["span"] is None
    old = [n for t in roll["tracks"] for n in t["notes"] if not n[3]]
    assert len(old) == 24  # the prompt's 16 piano + 8 bass notes
    assert http(server, "GET", continued["variations"][0]["png"])[0] == 200


def test_infill_route_keeps_every_note_outside_the_span(server, continued):
    v = continued["variations"][1]
    status, _, job = post(server, v["infill"], {"first": "2", "last": "3", "tracks": "33", "variations": "2",
                                                 "seed": "1"})
    assert status == 202 and job["mode"] == "infill" and job["span"] == [2, 3], job
    job = wait_done(server, job["id"])
    assert job["state"] == "done", job["error"]
    original = midi_of(server, v["midi"])
    lo, hi = span_ticks(original, 2, 3)
    for w in job["variations"]:
        new = midi_of(server, w["midi"])
        assert notes_outside(new, lo, hi) == notes_outside(original, lo, hi)
        piano = lambda s: sorted((n.time, n.pitch) for t in s.tracks if t.program == 0 for n in t.notes)  # noqa: E731
        assert piano(new) == piano(original)  # not regenerated: kept inside the span too
        assert "infill bars 2-3" in w["report"]
        _, _, roll = http(server, "GET", w["roll"])
        assert roll["span"] == [2, 3]
        assert all(lo / 480 <= n[0] < hi / 480 and t["program"] == 33 for t in roll["tracks"] for n in t["notes"]
                   if n[3])


def test_infill_route_refuses_bad_requests_in_one_line(server, continued):
    v = continued["variations"][0]
    _, _, roll = http(server, "GET", v["roll"])
    absent = next(p for p in range(128) if p not in {t["program"] for t in roll["tracks"]})
    for fields, code, words in (({"first": "5", "last": "2"}, 400, "the first bar is after the last"),
                                ({"first": "1", "last": "99"}, 400, "the last bar must be between 1 and"),
                                ({"first": "1", "last": "2", "tracks": str(absent)}, 400,
                                 "does not play in variation 1"),
                                ({}, 400, "select the bars first")):
        status, _, body = post(server, v["infill"], fields)
        assert status == code and words in body["error"], (fields, body)
    assert post(server, "/api/jobs/0000/0/infill", {"first": "1", "last": "1"})[0] == 404
    assert post(server, v["infill"].replace("/0/", "/7/"), {"first": "1", "last": "1"})[0] == 404


def test_a_model_without_infill_tokens_hides_and_refuses_it(tiny_run):
    from midistral.sampler import Sampler
    from midistral.studio.jobs import Studio

    studio = Studio(Sampler.load(tiny_run))
    try:
        assert studio.info()["infill"] is False
        with pytest.raises(MidistralError, match="Regenerate bars: this model was not trained for infilling"):
            studio.infill_request(None, None, {"first": "1", "last": "1"})
    finally:
        studio.close()


# ---------------------------------------------------------------------------------------------------
# The page


def test_select_bars_on_the_roll_and_regenerate(page, prompt):
    page.click("#mode-buttons button[data-mode=continue]")
    page.set_input_files("#prompt-file", str(prompt))
    page.wait_for_function("() => document.getElementById('prompt-info').textContent.includes('4 bars')")
    for key, value in dict(variations=1, length=2, seed=4).items():
        set_value(page, f"#{key}", value)
    page.click("#generate")
    wait_for_variations(page, 1)
    card = page.query_selector("#results .variation")
    page.wait_for_function("c => c.dataset.drawn === '1'", arg=card.query_selector("canvas.roll"))
    assert card.is_visible() and card.query_selector(".regen").is_visible()
    assert card.query_selector(".regenerate").is_disabled()
    # drag from the middle of bar 2 to the middle of bar 3
    roll = page.evaluate("u => fetch(u).then(r => r.json())", card.query_selector("a.download").get_attribute("href")
                         .replace("/midi", "/roll"))
    box = card.query_selector("canvas.roll").bounding_box()
    end = roll["bars"][-1]
    x = lambda beat: box["x"] + beat / end * box["width"]  # noqa: E731
    mid = lambda bar: x((roll["bars"][bar - 1] + roll["bars"][bar]) / 2)  # noqa: E731
    page.mouse.move(mid(2), box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(mid(3), box["y"] + box["height"] / 2, steps=5)
    page.mouse.up()
    assert card.query_selector(".regenerate").text_content() == "Regenerate bars 2-3"
    assert [card.eval_on_selector(f, "e => e.value") for f in (".first", ".last")] == ["2", "3"]
    card.query_selector(".regenerate").click()
    wait_for_variations(page, 2)
    new = page.query_selector_all("#results .variation")[1]
    assert "bars 2-3" in new.query_selector("h2").text_content()
    assert "bars 2-3 regenerated" in page.text_content("#results .group:last-child h3")
    page.wait_for_function("c => c.dataset.drawn === '1'", arg=new.query_selector("canvas.roll"))
    server_ = page.url.rstrip("/")
    original = midi_of(server_, card.query_selector("a.download").get_attribute("href"))
    result = midi_of(server_, new.query_selector("a.download").get_attribute("href"))
    lo, hi = span_ticks(original, 2, 3)
    assert notes_outside(result, lo, hi) == notes_outside(original, lo, hi)
    new_roll = page.evaluate("u => fetch(u).then(r => r.json())",
                             new.query_selector("a.download").get_attribute("href").replace("/midi", "/roll"))
    assert new_roll["span"] == [2, 3]
