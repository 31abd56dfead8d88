// Shared by the pages: the CSRF token, and reading an SSE answer as it streams.
"use strict";
const watcher = {
  csrf() {
    const meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.content : "";
  },
  // POST JSON to the /v1 API with stream: true; onChunk(text) for every piece. Resolves
  // when {"completed": true} arrives; rejects with the server's {"error"} message.
  async stream(url, body, onChunk) {
    const res = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": watcher.csrf() },
      body: JSON.stringify(Object.assign({}, body, { stream: true })),
    });
    if (!res.ok) {
      let message = res.status + " " + res.statusText;
      try { message = (await res.json()).error || message; } catch (e) { /* not JSON */ }
      throw new Error(message);
    }
    const type = res.headers.get("content-type") || "";
    if (!type.startsWith("text/event-stream")) {  // a server that answered in one piece
      const data = await res.json();
      onChunk(data.caption || data.answer || "");
      return;
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, end).trim();
        buffer = buffer.slice(end + 1);
        if (!line.startsWith("data:")) continue;
        const event = JSON.parse(line.slice(5));
        if (event.error) throw new Error(event.error);
        if (event.chunk) onChunk(event.chunk);
        if (event.completed) return;
      }
    }
  },
  dataUrl(blob) {
    return new Promise((resolve, reject) => {
      const r = new FileReader();
      r.onload = () => resolve(r.result);
      r.onerror = () => reject(r.error);
      r.readAsDataURL(blob);
    });
  },
};
