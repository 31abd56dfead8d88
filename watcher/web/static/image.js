// The image page: ask a question about this image through /v1/query; save it only if asked.
"use strict";
(function () {
  const page = document.querySelector(".image-page");
  const ask = document.getElementById("ask");
  if (!page || !ask) return;
  const answer = document.getElementById("answer");
  const save = document.getElementById("save-answer");
  ask.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const question = ask.elements.question.value.trim();
    if (!question) return;
    answer.textContent = "…";
    save.hidden = true;
    let text = "";
    try {
      // The large rendition (JPEG, upright) rather than the original: small to send, and
      // any format the server can decode.
      const res = await fetch("/thumb/" + page.dataset.id + "?size=l");
      if (!res.ok) throw new Error("cannot read the image (" + res.status + ")");
      const image = await watcher.dataUrl(await res.blob());
      answer.textContent = "";
      await watcher.stream("/v1/query", { image_url: image, question: question }, (chunk) => {
        text += chunk;
        answer.textContent = text;
      });
      save.elements.question.value = question;
      save.elements.answer.value = text;
      save.hidden = false;
    } catch (e) {
      answer.textContent = "Error: " + e.message;
    }
  });
})();
