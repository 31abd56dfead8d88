// The try page: an uploaded, dropped or pasted image, one task, the answer as it streams in.
"use strict";
(function () {
  const form = document.getElementById("try-form");
  const input = document.getElementById("file");
  const drop = document.getElementById("drop");
  const preview = document.getElementById("preview");
  const out = document.getElementById("try-answer");
  const error = document.getElementById("try-error");
  let image = null;  // a data: URL

  async function take(file) {
    if (!file || !file.type.startsWith("image/")) {
      show("That is not an image.");
      return;
    }
    image = await watcher.dataUrl(file);
    preview.src = image;
    preview.hidden = false;
    show("");
  }
  function show(message) {
    error.textContent = message;
    error.hidden = !message;
  }
  input.addEventListener("change", () => take(input.files[0]));
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    take(ev.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (ev) => {
    for (const item of ev.clipboardData.items) {
      if (item.type.startsWith("image/")) { take(item.getAsFile()); return; }
    }
  });
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (!image) { show("Choose an image first."); return; }
    const mode = form.elements.mode.value;
    let url = "/v1/caption", body = { image_url: image, length: mode };
    if (mode === "query") {
      const q = document.getElementById("question").value.trim();
      if (!q) { show("Write a question."); return; }
      url = "/v1/query";
      body = { image_url: image, question: q };
    }
    show("");
    out.textContent = "";
    out.dataset.done = "";
    const button = document.getElementById("go");
    button.disabled = true;
    let text = "";
    try {
      await watcher.stream(url, body, (chunk) => { text += chunk; out.textContent = text; });
      out.dataset.done = "1";
    } catch (e) {
      show(e.message);
    } finally {
      button.disabled = false;
    }
  });
})();
