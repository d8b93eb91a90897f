// A minimal voxpipe front-end in JavaScript: Node.js >= 18 with the npm packages zeromq 6 and
// @msgpack/msgpack only (no voxpipe code).  usage: node frontend.mjs TEXT [SESSION] [TIMEOUT_S]
import { randomBytes } from "node:crypto"
import { lstatSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { decode, encode } from "@msgpack/msgpack"
import { Publisher, Subscriber } from "zeromq"

const REPLY_STAGES = ["llm", "chunker", "tts", "player"] // a crash of one of these loses the reply
const HWM = 1000, MAX_BYTES = 4 * 1024 * 1024, SRC = "example-js"
const [text, session = "js", timeoutS = "30"] = process.argv.slice(2)
if (!text || !/^[A-Za-z0-9_.:@-]{1,64}$/.test(session) || !(Number(timeoutS) > 0)) {
  console.error("usage: node frontend.mjs TEXT [SESSION] [TIMEOUT_S]  (SESSION: [A-Za-z0-9_.:@-]{1,64})")
  process.exit(2)
}

function runtimeDir() {
  const env = process.env
  if (env.VOXPIPE_BUS__RUNTIME_DIR) return env.VOXPIPE_BUS__RUNTIME_DIR
  if (env.XDG_RUNTIME_DIR) return join(env.XDG_RUNTIME_DIR, "voxpipe")
  return join(tmpdir(), `voxpipe-${process.getuid()}`) // tmpdir(): $TMPDIR, else /tmp
}

// §2.1: the directory and its socket files must be yours, the directory closed to others; otherwise
// another local user may have planted a broker there to read and forge replies.
function isPrivate(dir) {
  for (const path of [dir, join(dir, "in.sock"), join(dir, "out.sock")]) {
    let info
    try { info = lstatSync(path) } catch {
      console.error(`no voxpipe bus is running (${path} does not exist); start one with \`voxpipe run\``)
      process.exit(1)
    }
    if (info.isSymbolicLink() || info.uid !== process.getuid() || (path === dir && (info.mode & 0o077))) {
      console.error(`${path} is a symlink, not yours, or open to others; refusing to connect (§2.1)`)
      process.exit(1)
    }
  }
  return dir
}

const nextSeq = new Map()  // "kind/session/id" -> next seq to send (§4)
const lastSeen = new Map() // "src kind/session/id" -> highest seq received

function frame(kind, session, id, body = {}) {
  const key = `${kind}/${session}/${id}`
  const seq = nextSeq.get(key) ?? 0
  nextSeq.set(key, seq + 1)
  // @msgpack/msgpack's defaults fit §6: strings -> str, Uint8Array -> bin, whole numbers -> int and
  // the rest -> float64 (ts). Never put `undefined` in a payload: it would be sent as nil.
  const payload = { v: 1, kind, session, id, seq, ts: Date.now() / 1000, src: SRC, ...body }
  return Buffer.concat([Buffer.from(`${kind}/${session} `), encode(payload)])
}

function parse(data) { // minimal checks (§6): one msgpack map whose kind/session match the topic
  const space = data.indexOf(0x20)
  if (space < 0) return null
  let msg
  try { msg = decode(data.subarray(space + 1)) } catch { return null }
  if (msg?.constructor !== Object) return null
  if (data.toString("utf8", 0, space) !== `${msg.kind}/${msg.session}`) return null
  const key = `${msg.src} ${msg.kind}/${msg.session}/${msg.id}`, seen = lastSeen.get(key)
  if (seen !== undefined && msg.seq > seen + 1) {
    console.error(`[gap: lost ${seen + 1}..${msg.seq - 1} of ${key}]`)
  }
  lastSeen.set(key, Math.max(msg.seq, seen ?? -1))
  return msg
}

const dir = isPrivate(runtimeDir())
// ZMTP heartbeats make a hung broker, like a dead one, drop the connection within 750 ms (§3)
const heartbeat = { heartbeatInterval: 250, heartbeatTimeout: 750 }
const pub = new Publisher({ linger: 1000, sendHighWaterMark: HWM, ...heartbeat })
const sub = new Subscriber({ linger: 0, receiveHighWaterMark: HWM, maxMessageSize: MAX_BYTES, ...heartbeat })
pub.connect(`ipc://${dir}/in.sock`)
let busLost = false // set the moment the connection to the broker drops: the reply cannot complete
sub.events.on("disconnect", () => { busLost = true })

async function receive(ms) { // one frame, or null when none came within `ms` milliseconds
  for (const end = performance.now() + ms; ;) {
    if (busLost) throw new Error("the voxpipe bus went away (its process ended or hung)")
    sub.receiveTimeout = Math.max(1, Math.min(100, Math.ceil(end - performance.now()))) // 100: see busLost
    try { return (await sub.receive())[0] } catch (err) { if (err.code !== "EAGAIN") throw err }
    if (performance.now() >= end) return null // libuv timers can fire early: wait out the rest
  }
}

// 1. subscribe to everything we want, THEN to our own hello, THEN connect (§3)
for (const kind of ["text", "llm.done", "playback", "command", "error"]) sub.subscribe(`${kind}/${session} `)
sub.subscribe("error/ ") // stage-wide errors (empty session), such as stage_crashed (§2.3)
const token = `${SRC}.${process.pid}.${randomBytes(4).toString("hex")}`
const helloTopic = Buffer.from(`hello/${token} `)
sub.subscribe(helloTopic)
sub.connect(`ipc://${dir}/out.sock`)
const isHello = (data) => data.subarray(0, helloTopic.length).equals(helloTopic)

// 2. publish our hello every 20 ms until it comes back through the broker
const hello = frame("hello", token, "")
const started = Date.now()
let pending = null
for (;;) {
  if (Date.now() - started > 10_000) {
    console.error(`no voxpipe bus answered in ${dir}; start it with \`voxpipe run\``)
    process.exit(1)
  }
  await pub.send(hello)
  const data = await receive(20)
  if (data && isHello(data)) break
}
// 3. drain the extra copies of our hello still in flight; keep the first other frame
for (let data; (data = await receive(40)); ) if (!isHello(data)) { pending = data; break }
console.error(`[handshake done in ${Date.now() - started} ms]`)

// 4. ask, then follow our request id until the final playback event
const rid = randomBytes(8).toString("hex")
await pub.send(frame("request", session, rid, { text }))
let code = 1, lineOpen = false // lineOpen: a reply line is streaming on stdout
const note = (line, print = console.error) => { print((lineOpen ? "\n" : "") + line); lineOpen = false }
for (;;) {
  let data
  try { data = pending ?? await receive(Number(timeoutS) * 1000) } catch (err) {
    note(`[${err.message}; this reply is lost, ask again once \`voxpipe run\` has restarted it]`)
    break
  }
  pending = null
  if (!data) { note(`[no progress for ${timeoutS} s; are the stages running?]`); break }
  if (data.subarray(0, 6).toString() === "hello/") continue // a late copy of our own hello
  const msg = parse(data)
  if (msg && msg.kind === "error" && msg.code === "stage_crashed" && REPLY_STAGES.includes(msg.stage)) {
    note(`[${msg.message}; this reply is lost, ask again]`)
    break // a stage the reply passes through died: it cannot complete
  }
  if (!msg || msg.id !== rid) continue // invalid, or not about our request
  if (msg.kind === "text") {
    process.stdout.write(msg.delta + (msg.final ? "\n" : ""))
    lineOpen = !msg.final
  } else if (msg.kind === "command") {
    const refused = msg.accepted ? "" : ` (refused: ${msg.reason})` // never act on a refused command
    note(`[command ${[msg.name, ...(msg.args ?? [])].join(" ")}${refused}]`, console.log)
  } else if (msg.kind === "error") {
    note(`[error ${msg.code}: ${msg.message}]`)
  } else if (msg.kind === "llm.done") {
    if (msg.status === "ok") continue // the text's final delta and the playback still follow
    note(`[llm.done ${msg.status} after ${msg.tokens} tokens${msg.error ? `: ${msg.error}` : ""}]`)
    break // error or interrupted: a final playback is not sure to come (§9)
  } else if (msg.kind === "playback" && msg.final) {
    note(`[playback ${msg.event}]`)
    code = msg.event === "finished" ? 0 : 1
    break
  } // other kinds and fields: ignored, as §6 asks
}
sub.close()
pub.close() // linger 1000 ms lets the last messages leave
process.exitCode = code
