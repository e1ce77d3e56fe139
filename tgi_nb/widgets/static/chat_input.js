// The chat's input box (anywidget): Enter sends, Shift+Enter starts a new line, as in chat apps. The text is
// synced as it is typed (`value`), for the Send button; Enter sends the text itself and empties the box here
// (ipywidgets holds back state changes while earlier ones are in flight: a late copy of the typed text must not
// come back after the send). Enter does nothing while the chat is not `ready` (a reply streams).

function render({ model, el }) {
  el.classList.add("tgi-chat-input");
  const area = document.createElement("textarea");
  area.className = "tgi-chat-input-area";
  area.rows = 2;
  // JupyterLab's shortcuts (Shift+Enter runs the cell, Enter enters edit mode) are matched on the document
  // before the box sees the key: this attribute keeps Lumino from matching them while typing here.
  area.setAttribute("data-lm-suppress-shortcuts", "true");
  area.placeholder = model.get("placeholder");
  area.value = model.get("value");
  area.disabled = model.get("disabled");
  el.appendChild(area);
  model.on("change:value", () => { if (area.value !== model.get("value")) area.value = model.get("value"); });
  model.on("change:disabled", () => { area.disabled = model.get("disabled"); });
  const sync = () => {
    model.set("value", area.value);
    model.save_changes();
  };
  area.addEventListener("input", sync);
  area.addEventListener("keydown", (event) => {
    if (event.key !== "Enter") return;
    event.stopPropagation();  // nothing else on the page acts on it (Notebook 7, VS Code)
    // Enter while an input method composes (Japanese, Chinese...) picks a candidate: never send then.
    if (event.isComposing || event.keyCode === 229) return;
    event.preventDefault();
    if (event.shiftKey) {
      // The new line is written here: in JupyterLab's output area the browser's own line break (a
      // beforeinput event) is cancelled before it reaches the box.
      area.setRangeText("\n", area.selectionStart, area.selectionEnd, "end");
      sync();
      return;
    }
    if (!model.get("ready") || !area.value.trim()) return;
    const text = area.value;
    area.value = "";
    sync();
    model.send({ op: "submit", text });
  });
}

export default { render };
