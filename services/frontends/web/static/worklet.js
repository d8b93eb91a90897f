// voxpipe web: the AudioWorklet that plays the replies' audio on the audio thread.
//
// The page hands it mono Float32 samples already at the AudioContext's rate, one segment per `audio`
// frame, in order. It plays them back to back (gapless across frames and chunks), behind a small jitter
// buffer: after silence it waits for PRIME_S of audio, or a chunk's end, before it sounds, so a late
// frame does not cut the sound into pieces. It reports what it actually rendered: the first sample of a
// chunk (`started`), the last sample of a chunk (`finished`), and a running count, which is what the
// page's playback reports and its test hook rely on, and each time it ran dry before a reply's end (`dry`:
// a gap the listener hears). `flush` drops everything at once (Stop).
"use strict";

const PRIME_S = 0.06;
const COUNT_EVERY = 8; // render quanta between two `count` messages (~20 ms at 48 kHz)

class VoxpipePlayer extends AudioWorkletProcessor {
  constructor() {
    super();
    this.queue = []; // {id, chunk, data: Float32Array, pos, last, final}
    this.buffered = 0; // samples waiting in the queue
    this.playing = false; // primed: sound until the queue runs dry
    this.rendered = 0; // samples rendered since the worklet started
    this.chunkRendered = 0; // samples rendered of the chunk now sounding
    this.current = null; // {id, chunk} of the chunk now sounding
    this.quanta = 0;
    this.prime = Math.round(PRIME_S * sampleRate);
    this.port.onmessage = (event) => this.receive(event.data);
  }

  receive(message) {
    if (message.type === "push") {
      this.queue.push({id: message.id, chunk: message.chunk, data: message.samples, pos: 0,
                       last: message.last, final: message.final});
      this.buffered += message.samples.length;
    } else if (message.type === "flush") {
      const current = this.current;
      this.port.postMessage({type: "flushed", total: this.rendered, id: current ? current.id : null,
                             chunk: current ? current.chunk : -1, chunkRendered: this.chunkRendered,
                             token: message.token});
      this.queue = [];
      this.buffered = 0;
      this.playing = false;
      this.current = null;
      this.chunkRendered = 0;
    }
  }

  ready() {
    if (this.playing) return true;
    const tail = this.queue[this.queue.length - 1];
    this.playing = this.buffered >= this.prime || (tail !== undefined && tail.last);
    return this.playing;
  }

  process(inputs, outputs) {
    const channels = outputs[0];
    const out = channels[0];
    let written = 0;
    if (this.queue.length && this.ready()) {
      let segment = null;
      while (written < out.length && this.queue.length) {
        segment = this.queue[0];
        if (this.current === null || this.current.id !== segment.id || this.current.chunk !== segment.chunk) {
          this.current = {id: segment.id, chunk: segment.chunk};
          this.chunkRendered = 0;
          this.port.postMessage({type: "started", id: segment.id, chunk: segment.chunk,
                                 total: this.rendered + written});
        }
        const take = Math.min(out.length - written, segment.data.length - segment.pos);
        out.set(segment.data.subarray(segment.pos, segment.pos + take), written);
        segment.pos += take;
        written += take;
        this.chunkRendered += take;
        this.buffered -= take;
        if (segment.pos >= segment.data.length) {
          this.queue.shift();
          if (segment.last) {
            this.port.postMessage({type: "finished", id: segment.id, chunk: segment.chunk, final: segment.final,
                                   total: this.rendered + written});
            this.current = null;
          }
        }
      }
      if (!this.queue.length) { // ran dry: prime again before the next sound
        this.playing = false;
        if (!(segment.last && segment.final)) {
          this.port.postMessage({type: "dry", id: segment.id, chunk: segment.chunk, total: this.rendered + written});
        }
      }
    }
    out.fill(0, written);
    for (let c = 1; c < channels.length; c++) channels[c].set(out);
    this.rendered += written;
    if (written && ++this.quanta % COUNT_EVERY === 0) this.port.postMessage({type: "count", total: this.rendered});
    else if (!written && this.quanta % COUNT_EVERY !== 0) {
      this.quanta = 0; // the sound stopped: report the exact total once
      this.port.postMessage({type: "count", total: this.rendered});
    }
    return true;
  }
}

registerProcessor("voxpipe-player", VoxpipePlayer);
