// loraplex persona chat: plain browser JavaScript, no build step, no dependencies.
"use strict";

(() => {
  const KEY_STORE = "loraplex.apiKey";
  const PERSONA_STORE = "loraplex.persona";
  const GEN_STORE = "loraplex.generation";

  const $ = (id) => document.getElementById(id);
  const el = {
    persona: $("persona"),
    refresh: $("refresh-models"),
    modelsStatus: $("persona-hint"),
    apiKey: $("api-key"),
    toggleKey: $("toggle-key"),
    temperature: $("temperature"),
    temperatureValue: $("temperature-value"),
    maxTokens: $("max-tokens"),
    messages: $("messages"),
    empty: $("empty"),
    composer: $("composer"),
    prompt: $("prompt"),
    send: $("send"),
    stop: $("stop"),
    newChat: $("new-chat"),
    error: $("error"),
    errorText: $("error-text"),
    errorClose: $("error-close"),
    uploadForm: $("upload-form"),
    uploadFieldset: $("upload-fieldset"),
    uploadHint: $("upload-hint"),
    uploadName: $("upload-name"),
    uploadConfig: $("upload-config"),
    uploadWeights: $("upload-weights"),
    uploadStatus: $("upload-status"),
    settings: $("settings"),
    toggleSettings: $("toggle-settings"),
  };

  // The conversation as sent to the server; each entry remembers which persona wrote it.
  const history = [];
  let baseId = null;
  let streaming = null; // {controller, bubble} while a reply is streaming
  let lastPersona = null;

  // ---------- helpers ----------

  function apiKey() {
    return el.apiKey.value.trim();
  }

  function authHeaders(extra) {
    const h = Object.assign({}, extra || {});
    const key = apiKey();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  async function errorMessage(res) {
    let text = "";
    try {
      text = await res.text();
      const body = JSON.parse(text);
      if (body && body.error && body.error.message) return body.error.message + " (HTTP " + res.status + ")";
    } catch (_) {
      /* not JSON: fall through */
    }
    return "HTTP " + res.status + " " + (res.statusText || "") + (text ? ": " + text.slice(0, 300) : "");
  }

  function showError(message) {
    el.errorText.textContent = message;
    el.error.hidden = false;
  }

  function clearError() {
    el.error.hidden = true;
    el.errorText.textContent = "";
  }

  function personaLabel(id) {
    return id === baseId || id === null ? "Base model" : id;
  }

  function personaHue(id) {
    let h = 0;
    for (const ch of String(id)) h = (h * 31 + ch.codePointAt(0)) % 360;
    return h;
  }

  function avatar(id) {
    const a = document.createElement("span");
    a.className = "avatar";
    a.setAttribute("aria-hidden", "true");
    const label = personaLabel(id);
    a.textContent = label.replace(/[^A-Za-z0-9]/g, "").slice(0, 1).toUpperCase() || "?";
    a.style.setProperty("--hue", id === baseId ? 220 : personaHue(id));
    return a;
  }

  function nearBottom() {
    const m = el.messages;
    return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
  }

  function scrollDown(force) {
    if (force || nearBottom()) el.messages.scrollTop = el.messages.scrollHeight;
  }

  // ---------- settings ----------

  function loadSettings() {
    el.apiKey.value = localStorage.getItem(KEY_STORE) || "";
    try {
      const g = JSON.parse(localStorage.getItem(GEN_STORE) || "{}");
      if (typeof g.temperature === "number") el.temperature.value = String(g.temperature);
      if (typeof g.maxTokens === "number") el.maxTokens.value = String(g.maxTokens);
    } catch (_) {
      /* ignore a corrupt entry */
    }
    el.temperatureValue.textContent = el.temperature.value;
  }

  function saveGeneration() {
    el.temperatureValue.textContent = el.temperature.value;
    const g = { temperature: Number(el.temperature.value), maxTokens: Number(el.maxTokens.value) };
    localStorage.setItem(GEN_STORE, JSON.stringify(g));
  }

  function generation() {
    let temperature = Number.parseFloat(el.temperature.value);
    if (!Number.isFinite(temperature)) temperature = 0.7;
    temperature = Math.min(2, Math.max(0, temperature));
    let maxTokens = Number.parseInt(el.maxTokens.value, 10);
    if (!Number.isFinite(maxTokens) || maxTokens < 1) maxTokens = 256;
    return { temperature, max_tokens: maxTokens };
  }

  function updateUploadState() {
    const hasKey = apiKey() !== "";
    el.uploadFieldset.disabled = !hasKey;
    el.uploadHint.textContent = hasKey
      ? "Uploads need an admin key; the server says so if this one is not."
      : "Enter an admin key above to upload a PEFT LoRA adapter.";
  }

  // ---------- personas ----------

  async function loadModels(select) {
    el.persona.dataset.state = "loading";
    el.modelsStatus.textContent = "Loading personas…";
    let res;
    try {
      res = await fetch("/v1/models", { headers: authHeaders() });
    } catch (e) {
      el.persona.dataset.state = "error";
      el.modelsStatus.textContent = "Could not reach the server: " + e.message;
      return;
    }
    if (!res.ok) {
      const msg = await errorMessage(res);
      el.persona.dataset.state = "error";
      el.modelsStatus.textContent =
        res.status === 401 ? "Enter an API key to see the personas. " + msg : "Personas unavailable: " + msg;
      return;
    }
    const body = await res.json();
    const models = (body && body.data) || [];
    const base = models.find((m) => !m.parent) || models[0];
    baseId = base ? base.id : null;
    // the base model's aliases (--served-model-name a b) are not personas: one "Base model" entry
    const shown = models.filter((m) => m === base || m.parent);
    const wanted = select || el.persona.value || localStorage.getItem(PERSONA_STORE) || "";
    el.persona.replaceChildren();
    for (const m of shown) {
      const opt = document.createElement("option");
      opt.value = m.id;
      opt.textContent = m.id === baseId ? "Base model" : m.id;
      opt.title = m.id === baseId ? m.id : "LoRA adapter on " + (m.parent || baseId);
      el.persona.append(opt);
    }
    const ids = shown.map((m) => m.id);
    el.persona.value = ids.includes(wanted) ? wanted : baseId || "";
    if (lastPersona === null || !history.length) lastPersona = el.persona.value;
    localStorage.setItem(PERSONA_STORE, el.persona.value);
    const n = shown.length - (base ? 1 : 0);
    el.modelsStatus.textContent = n === 1 ? "1 persona available." : n + " personas available.";
    el.persona.dataset.state = "ready";
  }

  function onPersonaChange() {
    const id = el.persona.value;
    localStorage.setItem(PERSONA_STORE, id);
    if (history.length && id !== lastPersona) {
      const note = document.createElement("div");
      note.className = "switch-note";
      note.dataset.testid = "persona-switch";
      note.textContent = "Now talking to " + personaLabel(id);
      el.messages.append(note);
      scrollDown(true);
    }
    lastPersona = id;
  }

  // ---------- conversation view ----------

  function userBubble(text) {
    el.empty.hidden = true;
    const row = document.createElement("div");
    row.className = "msg user";
    row.dataset.testid = "user-message";
    const bubble = document.createElement("div");
    bubble.className = "bubble";
    bubble.textContent = text;
    row.append(bubble);
    el.messages.append(row);
    return row;
  }

  function assistantBubble(persona) {
    const row = document.createElement("div");
    row.className = "msg assistant";
    row.dataset.testid = "assistant-message";
    row.dataset.persona = persona;
    row.dataset.state = "waiting";
    row.append(avatar(persona));
    const col = document.createElement("div");
    col.className = "msg-col";
    const meta = document.createElement("div");
    meta.className = "meta";
    const who = document.createElement("span");
    who.className = "persona-name";
    who.dataset.testid = "persona-label";
    who.textContent = personaLabel(persona);
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.dataset.testid = "message-status";
    meta.append(who, badge);
    const bubble = document.createElement("div");
    bubble.className = "bubble";
    bubble.dataset.testid = "message-text";
    const typing = document.createElement("span");
    typing.className = "typing";
    typing.setAttribute("aria-label", "writing");
    typing.innerHTML = "<i></i><i></i><i></i>";
    bubble.append(typing);
    col.append(meta, bubble);
    row.append(col);
    el.messages.append(row);
    return { row, bubble, badge, typing, text: "" };
  }

  function setState(b, state, label) {
    b.row.dataset.state = state;
    b.badge.textContent = label || "";
    b.badge.className = "badge " + state;
    if (state !== "waiting" && b.typing.isConnected && (b.text || state !== "streaming")) b.typing.remove();
  }

  function appendText(b, text) {
    if (!text) return;
    const follow = nearBottom();
    if (b.typing.isConnected) b.typing.remove();
    b.text += text;
    b.bubble.textContent = b.text.replace(/^\s+/, ""); // models often open with blank lines
    if (follow) scrollDown(true);
  }

  function setBusy(busy) {
    el.send.hidden = busy;
    el.stop.hidden = !busy;
    el.composer.dataset.state = busy ? "busy" : "idle";
  }

  // ---------- chat ----------

  async function* sseEvents(res) {
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, nl).replace(/\r$/, "");
        buffer = buffer.slice(nl + 1);
        if (line.startsWith("data:")) yield line.slice(5).trim();
      }
    }
    buffer += decoder.decode();
    if (buffer.startsWith("data:")) yield buffer.slice(5).trim();
  }

  async function send() {
    const text = el.prompt.value.trim();
    if (!text || streaming) return;
    const persona = el.persona.value;
    if (!persona) {
      showError("No persona selected: the persona list has not loaded (check the API key).");
      return;
    }
    clearError();
    el.prompt.value = "";
    autoGrow();
    const userEntry = { role: "user", content: text, persona: null };
    history.push(userEntry);
    userBubble(text);
    const b = assistantBubble(persona);
    scrollDown(true);

    const controller = new AbortController();
    streaming = { controller, bubble: b };
    setBusy(true);
    const body = Object.assign(
      {
        model: persona,
        messages: history.map((m) => ({ role: m.role, content: m.content })),
        stream: true,
      },
      generation()
    );
    let finish = null;
    try {
      const res = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: authHeaders({ "Content-Type": "application/json" }),
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!res.ok) throw new Error(await errorMessage(res));
      setState(b, "streaming", "");
      let sawDone = false;
      for await (const data of sseEvents(res)) {
        if (data === "[DONE]") {
          sawDone = true;
          break;
        }
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || "generation failed");
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        appendText(b, (choice.delta && choice.delta.content) || "");
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      if (!sawDone) throw new Error("the stream ended early");
      history.push({ role: "assistant", content: b.text, persona });
      setState(b, "done", finish === "length" ? "max tokens" : "");
      if (!b.text.trim()) b.bubble.textContent = "(empty reply)";
    } catch (e) {
      if (e.name === "AbortError") {
        if (b.text) history.push({ role: "assistant", content: b.text, persona });
        else history.splice(history.indexOf(userEntry), 1);
        setState(b, "stopped", "stopped");
        if (!b.text) b.bubble.textContent = "(stopped before any text)";
      } else {
        // A failed exchange is not sent again; the person can retry it.
        history.splice(history.indexOf(userEntry), 1);
        setState(b, "error", "error");
        b.bubble.textContent = e.message;
        b.row.classList.add("failed");
        showError(e.message);
        if (!el.prompt.value) el.prompt.value = text;
      }
    } finally {
      streaming = null;
      setBusy(false);
      el.prompt.focus();
    }
  }

  function stop() {
    if (streaming) streaming.controller.abort();
  }

  function newChat() {
    stop();
    history.length = 0;
    for (const node of [...el.messages.children]) if (node !== el.empty) node.remove();
    el.empty.hidden = false;
    clearError();
    el.prompt.focus();
  }

  function autoGrow() {
    el.prompt.style.height = "auto";
    el.prompt.style.height = Math.min(el.prompt.scrollHeight, 200) + "px";
  }

  // ---------- upload ----------

  async function upload(ev) {
    ev.preventDefault();
    const name = el.uploadName.value.trim();
    const config = el.uploadConfig.files[0];
    const weights = el.uploadWeights.files[0];
    el.uploadStatus.className = "status";
    const fail = (msg) => {
      el.uploadStatus.textContent = msg;
      el.uploadStatus.className = "status error";
      el.uploadStatus.dataset.state = "error";
      el.uploadStatus.scrollIntoView({ block: "nearest" });
    };
    if (!apiKey()) return fail("Enter an admin key first.");
    if (!name) return fail("Give the persona a name.");
    if (!config || !weights) return fail("Choose both files: adapter_config.json and adapter_model.safetensors.");
    const form = new FormData();
    form.append("name", name);
    form.append("adapter_config.json", config, "adapter_config.json");
    form.append("adapter_model.safetensors", weights, "adapter_model.safetensors");
    el.uploadStatus.textContent = "Uploading…";
    el.uploadStatus.dataset.state = "uploading";
    el.uploadFieldset.disabled = true;
    try {
      const res = await fetch("/v1/adapters", { method: "POST", headers: authHeaders(), body: form });
      if (!res.ok) return fail("Upload refused: " + (await errorMessage(res)));
      const record = await res.json();
      await loadModels(name);
      const version = record.version ? " (version " + String(record.version).slice(0, 12) + ")" : "";
      el.uploadStatus.textContent =
        (res.status === 200 ? "Already up to date: " : "Uploaded ") + name + version + ". Selected it.";
      el.uploadStatus.className = "status ok";
      el.uploadStatus.dataset.state = "done";
      el.uploadStatus.scrollIntoView({ block: "nearest" });
      el.uploadForm.reset();
      onPersonaChange();
    } catch (e) {
      fail("Upload failed: " + e.message);
    } finally {
      updateUploadState();
    }
  }

  // ---------- wiring ----------

  let keyTimer = null;
  el.apiKey.addEventListener("input", () => {
    localStorage.setItem(KEY_STORE, apiKey());
    updateUploadState();
    clearTimeout(keyTimer);
    keyTimer = setTimeout(() => loadModels(), 300);
  });
  el.toggleKey.addEventListener("click", () => {
    const show = el.apiKey.type === "password";
    el.apiKey.type = show ? "text" : "password";
    el.toggleKey.textContent = show ? "Hide" : "Show";
    el.toggleKey.setAttribute("aria-pressed", String(show));
  });
  el.temperature.addEventListener("input", saveGeneration);
  el.maxTokens.addEventListener("input", saveGeneration);
  el.persona.addEventListener("change", onPersonaChange);
  el.refresh.addEventListener("click", () => loadModels());
  el.composer.addEventListener("submit", (ev) => {
    ev.preventDefault();
    send();
  });
  el.prompt.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      send();
    }
  });
  el.prompt.addEventListener("input", autoGrow);
  el.stop.addEventListener("click", stop);
  el.newChat.addEventListener("click", newChat);
  el.errorClose.addEventListener("click", clearError);
  el.uploadForm.addEventListener("submit", upload);
  el.toggleSettings.addEventListener("click", () => {
    const open = el.settings.classList.toggle("open");
    el.toggleSettings.setAttribute("aria-expanded", String(open));
  });

  loadSettings();
  updateUploadState();
  setBusy(false);
  loadModels();
})();
