// The chat's input box and its Send button (anywidget): Enter or Send sends, Shift+Enter starts a new line, as
// in chat apps. A send carries the text itself and empties the box here: read in the kernel from a synced
// value, the text could arrive after the click (JupyterLab 4.6 may deliver two widgets' messages through
// different kernel threads, and ipywidgets holds back state changes while earlier ones are in flight). The
// text is still synced as it is typed (`value`), so the kernel can read and set it (Edit last). Nothing is
// sent while the chat is not `ready` (a reply streams).

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
  const send = document.createElement("button");
  send.className = "jupyter-widgets jupyter-button widget-button mod-primary tgi-chat-send";
  send.textContent = "Send";
  send.title = "Send (Enter)";
  el.append(area, send);
  const ready = () => { send.disabled = !model.get("ready"); };
  ready();
  model.on("change:ready", ready);
  model.on("change:value", () => { if (area.value !== model.get("value")) area.value = model.get("value"); });
  const sync = () => {
    model.set("value", area.value);
    model.save_changes();
  };
  const submit = () => {
    if (!model.get("ready") || !area.value.trim()) return;
    const text = area.value;
    area.value = "";
    sync();
    model.send({ op: "submit", text });
  };
  area.addEventListener("input", sync);
  send.addEventListener("click", submit);
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
    submit();
  });
}

export default { render };
