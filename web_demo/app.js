// Demo client for protocol v1: streams typed text, plays pcm_f32le 24 kHz audio with WebAudio as it arrives.
"use strict";
const $ = (id) => document.getElementById(id);
const RATE = 24000;
let ws = null, audioCtx = null, playAt = 0, ctxId = null, ctxN = 0, sent = "", firstTextAt = 0, gotAudio = false;

$("url").value = (location.protocol === "https:" ? "wss://" : "ws://") + (location.host || "127.0.0.1:8765") + "/v1/tts";

function log(s) { const d = $("log"); d.textContent += s + "\n"; d.scrollTop = d.scrollHeight; }
function send(msg) { if (ws && ws.readyState === 1) ws.send(MsgPack.encode(msg)); }

$("connect").onclick = () => {
  if (ws) { ws.close(); return; }
  const token = $("token").value.trim();
  ws = new WebSocket($("url").value + (token ? "?token=" + encodeURIComponent(token) : ""));
  ws.binaryType = "arraybuffer";
  ws.onopen = () => { $("status").textContent = "connected"; $("connect").textContent = "Disconnect"; send({ type: "voice.list" }); };
  ws.onclose = (e) => { $("status").textContent = `closed (${e.code}${e.reason ? " " + e.reason : ""})`; $("connect").textContent = "Connect"; ws = null; ctxId = null; };
  ws.onmessage = (e) => onMessage(MsgPack.decode(e.data));
};

function onMessage(msg) {
  switch (msg.type) {
    case "voices":
      $("voice").innerHTML = msg.voices.map((v) => `<option>${v.voice_id}</option>`).join("");
      log(`voices: ${msg.voices.map((v) => v.voice_id).join(", ") || "(none registered)"}`);
      break;
    case "started": log(`started ${msg.context_id}`); break;
    case "segment": log(`segment ${msg.index}: ${msg.text}`); break;
    case "audio": play(msg); break;
    case "done":
      log(`done ${msg.context_id}: ${msg.audio_seconds.toFixed(2)} s audio, RTF ${msg.real_time_factor?.toFixed(3)}, underruns ${msg.underruns}`);
      if (msg.context_id === ctxId) ctxId = null;
      break;
    case "cancelled": log(`cancelled ${msg.context_id}`); if (msg.context_id === ctxId) ctxId = null; break;
    case "error": log(`error ${msg.code}: ${msg.message}`); if (msg.context_id === ctxId) ctxId = null; break;
    default: log(JSON.stringify(msg));
  }
}

function play(msg) {
  if (msg.context_id !== ctxId) return;
  if (!gotAudio) {
    gotAudio = true;
    $("stats").textContent = `time to first audio: ${(performance.now() - firstTextAt).toFixed(0)} ms (from the first text sent)`;
  }
  const bytes = msg.audio;
  if (!bytes.length) return;
  const samples = new Float32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.length));
  const buf = audioCtx.createBuffer(1, samples.length, RATE);
  buf.copyToChannel(samples, 0);
  const src = audioCtx.createBufferSource();
  src.buffer = buf; src.connect(audioCtx.destination);
  playAt = Math.max(playAt, audioCtx.currentTime + 0.02);
  src.start(playAt);
  playAt += buf.duration;
}

function ensureContext() {
  if (!ws) { log("connect first"); return false; }
  audioCtx = audioCtx || new AudioContext({ sampleRate: RATE });
  audioCtx.resume();
  if (ctxId) return true;
  ctxId = "web-" + (++ctxN); sent = ""; gotAudio = false; firstTextAt = 0; playAt = 0;
  const voice = $("voice").value || undefined;
  send({ type: "start", context_id: ctxId, voice_id: voice, mode: $("mode").value, instruct_text: $("instruct").value,
         input_mode: $("inputMode").value, speed: parseFloat($("speed").value), encoding: "pcm_f32le", sample_rate: RATE });
  return true;
}

function sendText(piece) {
  if (!piece) return;
  if (!firstTextAt) firstTextAt = performance.now();
  send({ type: "text", context_id: ctxId, text: piece });
}

// Live typing: send what was appended since the last keystroke (edits before that point are not re-sent).
$("text").addEventListener("input", () => {
  if (!$("live").checked) return;
  const now = $("text").value;
  if (!now.startsWith(sent)) { sent = now; return; }
  if (!ensureContext()) return;
  sendText(now.slice(sent.length)); sent = now;
});

$("speak").onclick = async () => {
  if (!ensureContext()) return;
  const text = $("text").value, rate = parseFloat($("rate").value) || 0, id = ctxId;
  for (let i = 0; i < text.length && ctxId === id; i += 4) {
    sendText(text.slice(i, i + 4));
    if (rate > 0) await new Promise((r) => setTimeout(r, 4000 / rate));
  }
  if (ctxId === id) send({ type: "end", context_id: id });
};
$("flush").onclick = () => ctxId && send({ type: "flush", context_id: ctxId });
$("end").onclick = () => { if (ctxId) { send({ type: "end", context_id: ctxId }); } };
$("cancel").onclick = () => { if (ctxId) { send({ type: "cancel", context_id: ctxId }); playAt = 0; audioCtx && audioCtx.suspend().then(() => { audioCtx.close(); audioCtx = null; }); } };

// Links like /?autoconnect=1&voice=alice&text=Hello. connect and speak at once (demos, smoke tests).
(() => {
  const q = new URLSearchParams(location.search);
  if (q.get("token")) $("token").value = q.get("token");
  if (q.get("text")) { $("text").value = q.get("text"); $("live").checked = false; }
  if (!q.get("autoconnect")) return;
  $("connect").onclick();
  if (!q.get("text")) return;
  const wait = setInterval(() => {
    if (!ws || ws.readyState !== 1 || !$("voice").options.length && !q.get("voice")) return;
    clearInterval(wait);
    if (q.get("voice")) $("voice").innerHTML = `<option>${q.get("voice")}</option>`;
    $("speak").onclick();
  }, 100);
})();
