import io

from flywheel.progress import Progress


def test_a_long_loop_says_how_far_it_is_now_and_then_with_the_time_left():
    ticks = iter(range(0, 1000, 10))  # each step takes 10 s
    out = io.StringIO()
    progress = Progress("generating answers to prompts", 100, every_s=30, stream=out, clock=lambda: next(ticks))
    for _ in range(10):
        progress.advance(10)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # every 30 s, not every step, and not at the end
    assert lines[0] == "  generating answers to prompts: 30 of 100 (30 s, about 70 s left)"
