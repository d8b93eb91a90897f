// voxpipe web: the page. It talks to `voxpipe web` over one WebSocket (docs/protocol.md §8): it sends
// `request`, `cancel`, `playback` and `history` frames, shows the reply as its `text` deltas come, and
// plays the reply's audio (binary frames) through worklet.js. No framework, no build step: the gateway
// serves these files as they are.
"use strict";

const TEXTS = {
  en: {
    session: "Session", profile: "Profile", streaming: "Streaming", stream_default: "profile's",
    stream_on: "on", stream_off: "off", plays_on: "Sound", play_here: "here", play_daemon: "on the daemon",
    emotion: "Emotion", last_command: "Last command", send: "Send", stop: "Stop", history: "History",
    refresh: "Refresh", placeholder: "Ask something… (Enter sends, Shift+Enter is a new line, Esc stops)",
    connecting: "connecting…", connected: "connected", closed: "disconnected", you: "You",
    ttfa: "first audio", interrupted: "interrupted", error: "error", refused: "refused",
    heard: "heard", no_history: "Nothing yet.", bad_session: "A session name is 1–64 of A–Z a–z 0–9 _ . : @ -",
  },
  ru: {
    session: "Сессия", profile: "Профиль", streaming: "Потоком", stream_default: "как в профиле",
    stream_on: "да", stream_off: "нет", plays_on: "Звук", play_here: "здесь", play_daemon: "у демона",
    emotion: "Эмоция", last_command: "Последняя команда", send: "Отправить", stop: "Стоп", history: "История",
    refresh: "Обновить", placeholder: "Спросите что-нибудь… (Enter отправляет, Shift+Enter — новая строка, Esc — стоп)",
    connecting: "подключение…", connected: "подключено", closed: "нет связи", you: "Вы",
    ttfa: "первый звук", interrupted: "прервано", error: "ошибка", refused: "отклонено",
    heard: "услышано", no_history: "Пока пусто.", bad_session: "Имя сессии: 1–64 знака из A–Z a–z 0–9 _ . : @ -",
  },
};
const SESSION_RE = /^[A-Za-z0-9_.:@-]{1,64}$/;
const TOKEN = new URLSearchParams(location.search).get("token");

let lang = localStorage.getItem("voxpipe.lang") || (navigator.language.toLowerCase().startsWith("ru") ? "ru" : "en");
const $ = (id) => document.getElementById(id);
const t = (key) => TEXTS[lang][key] || TEXTS.en[key] || key;

/** A URL next to the page's, with the page's access token passed on. */
function pageUrl(path, params = {}) {
  const url = new URL(path, location.href);
  for (const [key, value] of Object.entries(params)) url.searchParams.set(key, value);
  if (TOKEN) url.searchParams.set("token", TOKEN);
  return url;
}

function applyLanguage() {
  document.documentElement.lang = lang;
  for (const node of document.querySelectorAll("[data-i18n]")) node.textContent = t(node.dataset.i18n);
  for (const button of document.querySelectorAll("[data-lang]")) {
    button.setAttribute("aria-pressed", String(button.dataset.lang === lang));
  }
  $("text").placeholder = t("placeholder");
  showConnection(connectionState);
  for (const reply of replies.values()) renderMeta(reply);
}

// ---------------------------------------------------------------------------------------------------
// Audio: an AudioContext started on the first user gesture, the worklet, and per-reply resampling.

const audio = {
  context: null,
  node: null,
  pending: [], // pushes that came before the worklet was ready
  rendered: 0, // samples the worklet rendered (its last report)
  stopToken: 0, // names the last flush, whose answer reports the replies in `stopping`
  stopping: [],
};

function startAudio() {
  if (audio.context) {
    if (audio.context.state === "suspended") audio.context.resume();
    return;
  }
  const context = new AudioContext({latencyHint: "interactive"});
  audio.context = context;
  const url = pageUrl("static/worklet.js").href;
  const player = context.audioWorklet
    ? context.audioWorklet.addModule(url).then(() => new AudioWorkletNode(context, "voxpipe-player",
                                                                        {numberOfInputs: 0, outputChannelCount: [2]}))
    : mainThreadPlayer(context, url);
  player.then((node) => {
    node.port.onmessage = (event) => onWorklet(event.data);
    node.connect(context.destination);
    audio.node = node;
    for (const [message, transfer] of audio.pending) node.port.postMessage(message, transfer);
    audio.pending = [];
  });
  if (context.state === "suspended") context.resume();
}

/** Browsers offer AudioWorklet only to a secure context: a page opened as http:// from another device
 * (the phone on the LAN) has none. There the same processor, worklet.js, runs on the main thread
 * inside a ScriptProcessorNode, with the globals of a worklet's scope provided for it. */
function mainThreadPlayer(context, url) {
  return new Promise((resolve, reject) => {
    const channel = new MessageChannel();
    window.sampleRate = context.sampleRate;
    window.AudioWorkletProcessor = class { constructor() { this.port = channel.port1; } };
    window.registerProcessor = (name, Processor) => {
      const processor = new Processor();
      const node = context.createScriptProcessor(1024, 0, 2);
      node.onaudioprocess = (event) => {
        const out = event.outputBuffer;
        processor.process([], [[out.getChannelData(0), out.getChannelData(1)]]);
      };
      resolve({port: channel.port2, connect: (destination) => node.connect(destination)});
    };
    const script = document.createElement("script");
    script.src = url;
    script.onerror = reject;
    document.head.appendChild(script);
  });
}

function toWorklet(message, transfer = []) {
  if (audio.node) audio.node.port.postMessage(message, transfer);
  else audio.pending.push([message, transfer]);
}

/** Integer PCM (little-endian, signed; width 1 unsigned as in WAV), interleaved → mono Float32. */
function decodePcm(view, header) {
  const {channels, width} = header;
  const frames = Math.floor(view.byteLength / (channels * width));
  const mono = new Float32Array(frames);
  for (let i = 0, at = 0; i < frames; i++) {
    let sum = 0;
    for (let c = 0; c < channels; c++, at += width) {
      if (width === 2) sum += view.getInt16(at, true) / 32768;
      else if (width === 1) sum += (view.getUint8(at) - 128) / 128;
      else if (width === 3) sum += ((view.getInt8(at + 2) << 16) | (view.getUint8(at + 1) << 8) | view.getUint8(at)) / 8388608;
      else sum += view.getInt32(at, true) / 2147483648;
    }
    mono[i] = sum / channels;
  }
  return mono;
}

/** Linear interpolation from the frame's rate to the context's, continuous across the frames of a reply
 * (it keeps the previous frame's last sample and the fractional position), so no seam is audible. */
function resample(reply, input, rate) {
  const target = audio.context ? audio.context.sampleRate : rate;
  if (rate === target) return input;
  let state = reply.resampler;
  if (!state || state.rate !== rate) state = reply.resampler = {rate, prev: 0, pos: 1};
  const step = rate / target;
  const count = Math.max(0, Math.ceil((input.length - state.pos) / step));
  const output = new Float32Array(count);
  let pos = state.pos; // in "previous sample, then input" coordinates: 0 is the previous frame's last sample
  for (let i = 0; i < count; i++, pos += step) {
    const index = Math.floor(pos);
    const frac = pos - index;
    const a = index === 0 ? state.prev : input[index - 1];
    const b = input[index];
    output[i] = a + (b - a) * frac;
  }
  if (input.length) {
    state.prev = input[input.length - 1];
    state.pos = pos - input.length;
  }
  return output;
}

function onAudioFrame(buffer) {
  const view = new DataView(buffer);
  const size = view.getUint32(0, true);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 4, size)));
  const reply = replyFor(header.id);
  if (reply.silenced) return; // stopped: what is still in flight is dropped
  if (reply.firstFrame === null) reply.firstFrame = performance.now();
  const mono = decodePcm(new DataView(buffer, 4 + size), header);
  const samples = resample(reply, mono, header.rate);
  const chunk = reply.chunks.get(header.chunk) || {received: 0, last: false, done: false, chars: 0};
  chunk.received += samples.length;
  chunk.last = chunk.last || header.last;
  chunk.chars = header.chars || chunk.chars;
  reply.chunks.set(header.chunk, chunk);
  reply.sourceSamples += mono.length;
  reply.sourceSeconds += mono.length / header.rate;
  toWorklet({type: "push", id: header.id, chunk: header.chunk, samples, last: header.last, final: header.final},
            [samples.buffer]);
}

function onWorklet(message) {
  audio.rendered = message.total;
  const reply = message.id ? replies.get(message.id) : null;
  if (message.type === "started" && reply && !reply.silenced) {
    reply.sounding = message.chunk;
    if (reply.firstRender === null) {
      reply.firstRender = performance.now();
      reply.firstRenderWall = performance.timeOrigin + reply.firstRender;
      reply.ttfaMs = reply.firstRender - reply.sentAt;
      renderMeta(reply);
    }
    sendPlayback(reply, "started", message.chunk, false, 0);
  } else if (message.type === "finished" && reply && !reply.silenced) {
    const chunk = reply.chunks.get(message.chunk);
    if (chunk) chunk.done = true;
    sendPlayback(reply, "finished", message.chunk, message.final, 1);
  } else if (message.type === "dry" && reply) {
    reply.gaps += 1;
  } else if (message.type === "flushed" && message.token === audio.stopToken) {
    audio.stoppedAt = performance.now();
    for (const stopped of audio.stopping) stoppedReport(stopped, message);
    audio.stopping = [];
  }
}

/** The `stopped` report of a reply cut off by Stop: the chunk that was sounding and how much of it played
 * (its expected length is the audio received, or for a chunk whose end had not come, its characters at
 * the reply's rate so far, as the daemon's player does). Between two chunks it is the last one started,
 * heard whole; before any sound, the first chunk that came, heard not at all. */
function stoppedReport(reply, flushed) {
  let chunkIndex = -1;
  let heard = 0;
  if (flushed.id === reply.id) {
    chunkIndex = flushed.chunk;
    const chunk = reply.chunks.get(chunkIndex);
    let expected = chunk ? chunk.received : 0;
    if (chunk && !chunk.last && chunk.chars) expected = Math.max(expected, chunk.chars * samplesPerChar(reply));
    heard = expected ? Math.min(1, flushed.chunkRendered / expected) : 0;
  } else if (reply.sounding !== null) {
    chunkIndex = reply.sounding;
    heard = reply.chunks.get(chunkIndex).done ? 1 : 0;
  } else if (reply.chunks.size) {
    chunkIndex = Math.min(...reply.chunks.keys());
  }
  sendPlayback(reply, "stopped", chunkIndex, true, heard);
}

function samplesPerChar(reply) {
  let samples = 0;
  let chars = 0;
  for (const chunk of reply.chunks.values()) {
    if (chunk.last && chunk.chars) {
      samples += chunk.received;
      chars += chunk.chars;
    }
  }
  return chars ? samples / chars : 0.06 * (audio.context ? audio.context.sampleRate : 48000);
}

function sendPlayback(reply, event, chunk, final, heard) {
  if (!reply.asked || reply.playback !== "client" || reply.reported) return;
  const known = reply.chunks.get(chunk);
  send({type: "playback", id: reply.id, event, chunk, final, heard,
        heard_chars: Math.round(heard * (known ? known.chars : 0))});
  if (final) reply.reported = true;
}

/** Silence this tab at once: the worklet drops what it holds, and what is still in flight for these
 * replies is dropped as it comes; each reports `stopped` with what was heard once the worklet says. */
function silence() {
  const playing = [...replies.values()].filter((reply) => reply.asked && reply.playback === "client"
                                                 && !reply.silenced && !reply.reported);
  for (const reply of playing) reply.silenced = true;
  audio.stopping = audio.stopping.concat(playing.filter((reply) => reply.chunks.size));
  audio.stopToken += 1;
  toWorklet({type: "flush", token: audio.stopToken});
}

/** Stop (button or Escape), a barge-in: silence here and cancel every reply of the session, so the
 * reply ends everywhere. */
function stop() {
  audio.stopClickedAt = performance.now();
  silence();
  send({type: "cancel", id: ""});
}

// ---------------------------------------------------------------------------------------------------
// Replies: one element per reply id, which grows with its text deltas.

const replies = new Map();

function replyFor(id) {
  let reply = replies.get(id);
  if (reply) return reply;
  reply = {
    id, asked: false, playback: "client", sentAt: null, text: "", status: null, ttfaMs: null,
    firstFrame: null, firstRender: null, firstRenderWall: null, gaps: 0, chunks: new Map(), sourceSamples: 0, sourceSeconds: 0,
    resampler: null, silenced: false, reported: false, sounding: null, daemonFirstPlaybackMs: null,
    element: document.createElement("article"),
  };
  reply.element.className = "reply";
  reply.element.innerHTML = '<p class="user"></p><p class="assistant"></p><p class="meta"></p>';
  $("replies").appendChild(reply.element);
  replies.set(id, reply);
  return reply;
}

function renderMeta(reply) {
  const parts = [];
  if (reply.ttfaMs !== null) parts.push(`${t("ttfa")} ${Math.round(reply.ttfaMs)} ms`);
  else if (reply.daemonFirstPlaybackMs !== null) parts.push(`${t("ttfa")} ${Math.round(reply.daemonFirstPlaybackMs)} ms`);
  if (reply.status === "interrupted") parts.push(t("interrupted"));
  else if (reply.status === "error") parts.push(t("error"));
  if (reply.error) parts.push(reply.error);
  reply.element.querySelector(".meta").textContent = parts.join(" · ");
}

function scrollDown() {
  const list = $("replies");
  list.scrollTop = list.scrollHeight;
}

function showCommand(name, args, accepted) {
  if (name === "e" && accepted && args.length) $("emotion").textContent = args[0];
  const command = $("command");
  command.textContent = `<${name}>${args.join(",")}`;
  command.classList.toggle("refused", !accepted);
  command.title = accepted ? "" : t("refused");
}

const HANDLERS = {
  hello(frame) {
    const select = $("profile");
    const chosen = select.value || localStorage.getItem("voxpipe.profile") || frame.default_profile;
    select.replaceChildren(...frame.profiles.map((name) => new Option(name, name)));
    select.value = frame.profiles.includes(chosen) ? chosen : frame.default_profile;
    askHistory();
  },
  text(frame) {
    const reply = replyFor(frame.id);
    reply.text += frame.delta;
    reply.element.querySelector(".assistant").textContent = reply.text;
    for (const mark of frame.marks || []) showCommand(mark.tag, [mark.body], true);
    scrollDown();
  },
  command(frame) {
    showCommand(frame.name, frame.args || [], frame.accepted);
  },
  "llm.done"(frame) {
    const reply = replyFor(frame.id);
    reply.status = frame.status;
    reply.error = frame.error || "";
    reply.element.dataset.status = frame.status;
    renderMeta(reply);
    askHistory();
  },
  error(frame) {
    const reply = frame.id ? replyFor(frame.id) : null;
    if (reply) {
      reply.error = `${frame.code}: ${frame.message}`;
      renderMeta(reply);
    }
  },
  metrics(frame) {
    const reply = replies.get(frame.id);
    if (reply && frame.first_playback_ms >= 0) {
      reply.daemonFirstPlaybackMs = frame.first_playback_ms;
      renderMeta(reply);
    }
  },
  playback() {}, // the daemon's player or another tab: this tab shows its own sound only
  history(frame) {
    const list = $("history");
    const items = frame.messages.map((message) => {
      const item = document.createElement("li");
      item.className = message.role;
      item.textContent = message.content;
      return item;
    });
    if (!items.length) items.push(Object.assign(document.createElement("li"), {textContent: t("no_history")}));
    list.replaceChildren(...items);
  },
  refused(frame) {
    $("notice").textContent = `${t("refused")}: ${frame.reason}`;
  },
};

// ---------------------------------------------------------------------------------------------------
// The WebSocket: one per tab, reopened on a session change or after a drop.

let socket = null;
let connectionState = "closed";
let retry = 0;

function showConnection(state) {
  connectionState = state;
  const node = $("connection");
  node.dataset.state = state;
  node.textContent = t(state);
}

function connect() {
  if (socket) {
    socket.onclose = null;
    socket.close();
  }
  const session = $("session").value;
  const url = pageUrl("ws", {session});
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(url.href);
  ws.binaryType = "arraybuffer";
  socket = ws;
  showConnection("connecting");
  ws.onopen = () => {
    retry = 0;
    showConnection("connected");
  };
  ws.onmessage = (event) => {
    if (typeof event.data !== "string") {
      onAudioFrame(event.data);
      return;
    }
    const frame = JSON.parse(event.data);
    const handler = HANDLERS[frame.type];
    if (handler) handler(frame);
  };
  ws.onclose = (event) => {
    showConnection("closed");
    if (event.reason) $("notice").textContent = event.reason; // 1008 flooding, 1013 too slow, 1001 stopping
    retry = Math.min(retry + 1, 5);
    setTimeout(() => { if (socket === ws) connect(); }, 1000 * retry);
  };
}

function send(frame) {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(frame));
  if (frame.type === "request") $("notice").textContent = ""; // a refusal is about an earlier frame
}

function askHistory() {
  send({type: "history", limit: 20});
}

function newId() {
  const bytes = crypto.getRandomValues(new Uint8Array(8));
  return "w" + Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
}

function ask(text) {
  if (!text.trim() || !socket || socket.readyState !== WebSocket.OPEN) return false;
  startAudio();
  const playback = $("playback").value;
  silence(); // a new question is a barge-in: llm cancels the reply it was writing, and its sound stops here
  const id = newId();
  const reply = replyFor(id);
  Object.assign(reply, {asked: true, playback, sentAt: performance.now()});
  reply.element.classList.add("mine");
  reply.element.querySelector(".user").textContent = text;
  const stream = {"": null, on: true, off: false}[$("stream").value];
  send({type: "request", id, text, profile: $("profile").value, stream, playback});
  voxpipeTest.lastId = id;
  scrollDown();
  return true;
}

// ---------------------------------------------------------------------------------------------------
// The test hook (tests/test_web_browser.py and the bench read it through selenium).

const voxpipeTest = {
  lastId: null,
  renderedSamples: () => audio.rendered,
  sampleRate: () => (audio.context ? audio.context.sampleRate : null),
  lastTtfaMs: () => (voxpipeTest.lastId ? replies.get(voxpipeTest.lastId).ttfaMs : null),
  stopLatencyMs: () => (audio.stoppedAt !== undefined ? audio.stoppedAt - audio.stopClickedAt : null),
  reply: (id) => {
    const reply = replies.get(id || voxpipeTest.lastId);
    if (!reply) return null;
    return {id: reply.id, text: reply.text, status: reply.status, ttfaMs: reply.ttfaMs,
            firstRenderWall: reply.firstRenderWall, sentWall: performance.timeOrigin + reply.sentAt,
            firstFrameWall: reply.firstFrame === null ? null : performance.timeOrigin + reply.firstFrame,
            sourceSamples: reply.sourceSamples, sourceSeconds: reply.sourceSeconds, reported: reply.reported,
            gaps: reply.gaps};
  },
  connected: () => connectionState === "connected",
  /** How far the page's clock (performance.timeOrigin + now(), what the *Wall times use) is ahead of
   * the system's wall clock (Date.now(), the time.time() of the processes on the bus), in ms. */
  clockAheadMs: () => {
    let sum = 0;
    let count = 0;
    const end = performance.now() + 20; // over many of Date.now()'s whole milliseconds, so they average out
    for (let now = performance.now(); now < end; now = performance.now(), count++) {
      sum += performance.timeOrigin + now - Date.now();
    }
    return sum / count - 0.5; // Date.now() truncates: on average it is half a millisecond behind
  },
};
window.voxpipeTest = voxpipeTest;

// ---------------------------------------------------------------------------------------------------

function main() {
  const session = $("session");
  session.value = new URLSearchParams(location.search).get("session") || localStorage.getItem("voxpipe.session") || "web";
  session.addEventListener("change", () => {
    if (!SESSION_RE.test(session.value)) {
      session.setCustomValidity(t("bad_session"));
      session.reportValidity();
      return;
    }
    session.setCustomValidity("");
    localStorage.setItem("voxpipe.session", session.value);
    silence();
    $("replies").replaceChildren();
    replies.clear();
    connect();
  });
  $("profile").addEventListener("change", (event) => localStorage.setItem("voxpipe.profile", event.target.value));
  for (const button of document.querySelectorAll("[data-lang]")) {
    button.addEventListener("click", () => {
      lang = button.dataset.lang;
      localStorage.setItem("voxpipe.lang", lang);
      applyLanguage();
    });
  }
  const text = $("text");
  $("ask").addEventListener("submit", (event) => {
    event.preventDefault();
    if (ask(text.value)) text.value = "";
  });
  text.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("ask").requestSubmit();
    }
  });
  $("stop").addEventListener("click", stop);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") stop();
  });
  $("history-refresh").addEventListener("click", askHistory);
  // Browsers start sound only after a user gesture: the first one creates the AudioContext.
  for (const kind of ["pointerdown", "keydown", "touchstart"]) {
    document.addEventListener(kind, startAudio, {capture: true, passive: true});
  }
  applyLanguage();
  connect();
}

main(); // the script is deferred: the document is parsed
