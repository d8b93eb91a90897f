"""The browser front-end: what `voxpipe web` and the page add to the time to first audio.

One run, side by side per reply: the first `audio` frame of a reply as a bus client receives it (the
bench's own subscriber, beside the gateway's), the same frame's arrival in the page (after the gateway
and the WebSocket), and the first sample the page's AudioWorklet rendered (after decoding, resampling
and the jitter buffer). The browser is Debian's headless chromium, driven by selenium (the dev extra),
on the real daemon with the fake OpenAI server and espeak-ng. The page's times are on its own clock,
which is put onto the system's wall clock (the bus's) by the page's test hook `clockAheadMs`.
"""

from __future__ import annotations

import sys
import threading
import time

from tests.bench.stats import percentile
from tests.test_web_browser import CHROMEDRIVER, CHROMIUM, Watch, web_stack

TOKEN_DELAY_S = 0.025
"""40 tokens/s, as in §2."""
GATEWAY_BUDGET_MS = 10.0
"""The issue's bound on what the gateway adds (p50)."""


def listen(watch: Watch, stop: threading.Event) -> None:
    """Read the bus in a thread of its own, so each frame is stamped as it comes, not when the bench looks."""
    while not stop.is_set():
        message = watch.client.receive(0.05)
        if message is not None:
            watch.seen.append((time.time(), message))


def measure(replies: int) -> list[dict[str, float]]:
    """Milliseconds per reply: request → first audio on the bus, bus → page, page → first rendered sample."""
    samples = []
    session = "bench-web"
    with web_stack(delay=TOKEN_DELAY_S) as (daemon, gateway, browser):
        watch = Watch(daemon, session)
        stop = threading.Event()
        reader = threading.Thread(target=listen, args=(watch, stop), daemon=True)
        reader.start()
        try:
            browser.open(f"{gateway.url}?session={session}")
            for number in range(replies + 1):  # the first warms espeak-ng, the page and the audio graph
                id = browser.ask(f"Hello number {number}, how are you")
                reply = browser.wait(lambda id=id: (lambda r: r if r["reported"] else None)(browser.hook("reply", id)),
                                     "the reply to play out", timeout=60)
                ahead_ms = browser.hook("clockAheadMs")
                rates = (next(m.body.rate for _, m in watch.seen if m.kind == "audio" and m.id == id),
                         browser.hook("sampleRate"))
                bus_ms = watch.first_audio_at(id) * 1000
                frame_ms, render_ms = reply["firstFrameWall"] - ahead_ms, reply["firstRenderWall"] - ahead_ms
                if number:
                    samples.append({"bus": bus_ms - (reply["sentWall"] - ahead_ms), "gateway": frame_ms - bus_ms,
                                    "render": render_ms - frame_ms, "total": render_ms - bus_ms,
                                    "ttfa": reply["ttfaMs"], "tts_rate": rates[0], "page_rate": rates[1],
                                    "gaps": reply["gaps"]})
        finally:
            stop.set()
            reader.join()
            watch.close()
    return samples


def run(quick: bool = False) -> str:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        return "## Browser\n\nSkipped: needs the apt packages chromium and chromium-driver (`make apt`).\n"
    samples = measure(5 if quick else 20)

    def row(key: str, label: str) -> str:
        values = [sample[key] for sample in samples]
        return (f"| {label} | {percentile(values, .5):.1f} | {percentile(values, .9):.1f} | {min(values):.1f} | "
                f"{max(values):.1f} |")

    tts_rate, page_rate = samples[0]["tts_rate"], samples[0]["page_rate"]
    gateway_p50 = percentile([sample["gateway"] for sample in samples], .5)
    verdict = "within" if gateway_p50 < GATEWAY_BUDGET_MS else "**over**"
    return "\n".join([
        "## Browser",
        "",
        f"{len(samples)} replies (after one warm-up) asked from the page in headless chromium through `voxpipe web`, "
        f"playback \"client\", fake OpenAI server at {1 / TOKEN_DELAY_S:.0f} tokens/s, espeak-ng. Per reply, the "
        "first `audio` frame as a bus subscriber beside the gateway receives it, the same frame's arrival in the "
        "page, and the first sample the page's AudioWorklet rendered (chromium plays into ALSA's null device). "
        f"espeak-ng speaks at {tts_rate:.0f} Hz, the page's AudioContext runs at {page_rate:.0f} Hz"
        + (": the page resamples." if tts_rate != page_rate else "."),
        "",
        "| ms | p50 | p90 | min | max |",
        "|---|---|---|---|---|",
        row("bus", "request sent in the page → first `audio` frame on the bus"),
        row("gateway", "**first `audio` on the bus → in the page (gateway + WebSocket)**"),
        row("render", "in the page → first sample rendered (decode, resample, jitter buffer, audio thread)"),
        row("total", "first `audio` on the bus → first sample rendered"),
        row("ttfa", "time to first audio shown by the page (request sent → first sample rendered)"),
        "",
        "A negative time means the bench's own subscriber, a Python thread beside selenium's calls, read the frame "
        "after the gateway had already passed it on; the page's clock is put on the wall clock to within a "
        "millisecond.",
        "",
        f"The gateway adds {gateway_p50:.1f} ms at p50, {verdict} the {GATEWAY_BUDGET_MS:.0f} ms budget. The page's "
        f"player ran dry before a reply's end {sum(sample['gaps'] for sample in samples):.0f} times in all (a gap "
        "the listener hears, between frames or chunks).",
        ""])


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
