"""Progress bars that leave their last frame, not their first, in a saved notebook.

A tqdm bar in a Jupyter kernel is a widget; the notebook file keeps the widget's text form as it was when it
was first shown ("Indexing:   0%", "pending [00:00]"), and every later frame only reaches the widget's state,
which GitHub, nbviewer and ``jupyter nbconvert`` do not draw. :func:`progress_bar` shows the widget under a
display id and, when the bar closes, replaces that output with the bar's final line as text. Outside a kernel
it is tqdm's own bar on stderr. Leaf module: it imports nothing from tgi_nb.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Optional


def progress_bar(desc: str, total: Optional[float] = None, **kwargs: Any) -> Any:
    """A ``tqdm`` bar (``tqdm.auto``'s choice of widget or text) that, in a notebook, ends as one line of text.

    Keyword arguments are tqdm's (``unit``, ``bar_format``, ``mininterval``, ``leave``...). Close it (or use it
    as a context manager) for the final line to replace the widget.

    Example:
        >>> with progress_bar("Indexing", total=3, unit="chunk", disable=True) as bar:
        ...     bar.update(3)
    """
    with warnings.catch_warnings():  # tqdm.auto warns when ipywidgets is missing, then uses the text bar
        warnings.simplefilter("ignore")
        from tqdm.auto import tqdm
        from tqdm.notebook import tqdm as notebook_tqdm
    if kwargs.get("disable") or not issubclass(tqdm, notebook_tqdm):
        return tqdm(total=total, desc=desc, **kwargs)
    return _notebook_bar_class()(total=total, desc=desc, **kwargs)


@functools.lru_cache(maxsize=None)
def _notebook_bar_class() -> type:
    from tqdm.notebook import tqdm as notebook_tqdm

    class NotebookBar(notebook_tqdm):
        """tqdm's notebook widget shown under a display id, replaced by its final line as text on close."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            from IPython.display import display

            kwargs.pop("delay", None)  # shown at once: the display id is taken here
            super().__init__(*args, display=False, **kwargs)
            self._handle = None
            if not self.disable:
                self._handle = display(self.container, display_id=True)
                self.displayed = True

        def close(self) -> None:
            handle, self._handle = self._handle, None
            super().close()
            if handle is not None:
                handle.update({"text/plain": repr(self.container) if self.leave else ""}, raw=True)
                self.container.close()  # its view is gone: free the widget's comm

    return NotebookBar

