// The chat's input box (anywidget): Enter sends, Shift+Enter starts a new line, as in chat apps. The text is
// synced as it is typed (`value`); a send carries the text itself, so it never races the last keystroke.

function render({ model, el }) {
  el.classList.add("tgi-chat-input");
  const area = document.createElement("textarea");
  area.className = "tgi-chat-input-area";
  area.rows = 2;
  area.placeholder = model.get("placeholder");
  area.value = model.get("value");
  area.disabled = model.get("disabled");
  el.appendChild(area);
  model.on("change:value", () => { if (area.value !== model.get("value")) area.value = model.get("value"); });
  model.on("change:disabled", () => { area.disabled = model.get("disabled"); });
  area.addEventListener("input", () => {
    model.set("value", area.value);
    model.save_changes();
  });
  area.addEventListener("keydown", (event) => {
    if (event.key !== "Enter") return;
    event.stopPropagation();  // JupyterLab's shortcuts (Shift+Enter runs the cell) stay out of the box
    // Enter while an input method composes (Japanese, Chinese...) picks a candidate: never send then.
    if (event.shiftKey || event.isComposing || event.keyCode === 229) return;
    event.preventDefault();
    model.send({ op: "submit", text: area.value });
  });
}

export default { render };
