// The chat transcript's front-end (anywidget). Finished messages come from the synced `entries`; the reply that
// streams grows by the kernel's numbered {"op": "append", "seq", "field", "text"} messages. The kernel puts the
// streamed text so far into the state it sends, so a second view or a reloaded page starts from the whole
// conversation; a view that missed an append (it was created between two) asks for the state again.

function make(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    return navigator.clipboard.writeText(text).catch(() => fallbackCopy(text));
  }
  return Promise.resolve(fallbackCopy(text));
}

function fallbackCopy(text) {
  // Pages served over plain http from another host have no navigator.clipboard.
  const area = make("textarea");
  area.value = text;
  area.style.position = "fixed";
  area.style.opacity = "0";
  document.body.appendChild(area);
  area.select();
  try { document.execCommand("copy"); } finally { area.remove(); }
}

function copyButton(className, title, getText) {
  const button = make("button", `tgi-chat-copy-button ${className}`, "Copy");
  button.title = title;
  button.addEventListener("click", (event) => {
    event.stopPropagation();
    copyText(getText()).then(() => {
      button.textContent = "Copied";
      setTimeout(() => { button.textContent = "Copy"; }, 1500);
    });
  });
  return button;
}

function thinkingNode(text, streaming) {
  const details = make("details", "tgi-chat-thinking");
  details.open = streaming;  // open while it streams, folded once the answer came
  details.appendChild(make("summary", "", streaming ? "Thinking…" : "Thinking"));
  details.appendChild(make("div", "tgi-chat-thinking-body", text || ""));
  details.hidden = !text;
  return details;
}

function statsNode(entry) {
  const stats = make("div", "tgi-chat-stats");
  const parts = entry.stats_parts || [[entry.stats, ""]];
  parts.forEach(([text, title], i) => {
    if (i) stats.appendChild(document.createTextNode(" · "));
    const part = make("span", title ? "tgi-chat-stat tgi-has-tip" : "tgi-chat-stat", text);
    if (title) part.title = title;
    stats.appendChild(part);
  });
  if (entry.settings) {
    stats.appendChild(document.createTextNode(" · "));
    const settings = make("span", "tgi-chat-settings tgi-has-tip", "settings");
    settings.title = `This reply was made with: ${entry.settings}`;
    stats.appendChild(settings);
  }
  return stats;
}

function entryNode(entry, index, model) {
  const node = make("div", `tgi-chat-message tgi-chat-${entry.role}` + (entry.streaming ? " tgi-chat-streaming" : ""));
  if (entry.role === "assistant") node.appendChild(thinkingNode(entry.reasoning, !!entry.streaming));
  const body = make("div", "tgi-chat-body");
  if (entry.html) {
    body.innerHTML = entry.html;  // rendered in the kernel with raw HTML escaped
    body.querySelectorAll("pre").forEach((pre) => {
      const wrap = make("div", "tgi-chat-code-block");
      pre.replaceWith(wrap);
      wrap.append(copyButton("tgi-chat-copy-code", "Copy this code", () => pre.textContent), pre);
    });
  } else {
    body.textContent = entry.text || "";
  }
  node.appendChild(body);
  if (entry.notice) node.appendChild(make("div", "tgi-chat-notice", entry.notice));
  if (entry.stats || entry.actions || (entry.role === "assistant" && !entry.streaming)) {
    const footer = make("div", "tgi-chat-footer");
    if (entry.stats) footer.appendChild(statsNode(entry));
    for (const [name, label, title] of entry.actions || []) {
      const action = make("button", `tgi-chat-action tgi-chat-action-${name}`, label);
      action.title = title;
      action.addEventListener("click", () => model.send({ op: "action", name, index }));
      footer.appendChild(action);
    }
    if (entry.role === "assistant" && !entry.streaming) {
      footer.appendChild(copyButton("tgi-chat-copy", "Copy this reply (markdown)", () => entry.text || ""));
    }
    node.appendChild(footer);
  }
  return node;
}

function render({ model, el }) {
  el.classList.add("tgi-chat-transcript");
  let seq = 0;           // the next append this view expects
  let syncing = false;   // asked the kernel for the state; appends wait for it
  let stick = true;      // follow the newest message unless the user scrolled up
  const toBottom = () => { if (stick) el.scrollTop = el.scrollHeight; };
  const draw = () => {
    const entries = model.get("entries");
    el.replaceChildren(...entries.map((entry, i) => entryNode(entry, i, model)));
    const last = entries[entries.length - 1];
    seq = last && last.streaming ? last.seq || 0 : 0;
    syncing = false;
    toBottom();
  };
  model.on("change:entries", draw);
  model.on("msg:custom", (msg) => {
    if (msg.op !== "append" || syncing || msg.seq < seq) return;  // already in the state this view drew
    const node = el.querySelector(".tgi-chat-streaming:last-child");
    if (!node) return;
    if (msg.seq > seq) {  // some appends went by before this view existed: draw from the state again
      syncing = true;
      model.send({ op: "sync" });
      return;
    }
    seq += 1;
    if (msg.field === "reasoning") {
      const thinking = node.querySelector(".tgi-chat-thinking");
      thinking.hidden = false;
      thinking.querySelector(".tgi-chat-thinking-body").appendChild(document.createTextNode(msg.text));
    } else {
      node.querySelector(".tgi-chat-body").appendChild(document.createTextNode(msg.text));
    }
    toBottom();
  });
  el.addEventListener("scroll", () => { stick = el.scrollHeight - el.scrollTop - el.clientHeight < 40; });
  // Drawn while hidden (a background tab, a page still laying out), the transcript has no height to scroll:
  // scroll to the newest message once it has one.
  const resized = new ResizeObserver(toBottom);
  resized.observe(el);
  draw();
  return () => resized.disconnect();
}

export default { render };
