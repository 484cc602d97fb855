"""The model catalog in the panel: search, one line per model, the details pane."""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def _words(model: Mapping) -> str:
    labels = model.get("labels") or {}
    names = labels.values() if isinstance(labels, Mapping) else labels
    fields = [model.get(key, "") for key in ("id", "title", "modality", "anatomy", "task",
                                             "kind", "licence")]
    return " ".join(str(f) for f in [*fields, *names]).casefold()


def filter_models(models: Iterable[Mapping], text: str) -> list[Mapping]:
    """The models whose id, title, modality, anatomy, task or labels contain every word."""
    words = text.casefold().split()
    return [m for m in models if all(w in _words(m) for w in words)]


def model_line(model: Mapping) -> str:
    """One line for the catalog list: title, modality, and whether it is here already."""
    title = model.get("title") or model.get("id", "?")
    tags = [model.get("modality") or "", "fine-tuned" if model.get("kind") == "fine-tuned"
            else "", "" if model.get("cached") else "not downloaded"]
    tags = [t for t in tags if t]
    return f"{title}  [{', '.join(tags)}]" if tags else title


def model_details(model: Mapping) -> str:
    """HTML for the details pane of one catalog entry."""
    from html import escape

    labels = model.get("labels") or {}
    names = [n for v, n in sorted(labels.items(), key=lambda i: int(i[0])) if int(v)] \
        if isinstance(labels, Mapping) else list(labels)
    rows = [
        ("Modality", model.get("modality", "")),
        ("Anatomy", model.get("anatomy", "")),
        ("Task", model.get("task", "")),
        ("Labels", f"{len(names)}: " + ", ".join(names) if names else "-"),
        ("Licence", model.get("licence", "")),
        ("Kind", model.get("kind", "")),
        ("On this computer", "yes" if model.get("cached") else "no (fetch it first)"),
        ("Checksum verified", "yes" if model.get("verified") else "no"),
    ]
    title = escape(str(model.get("title") or model.get("id", "")))
    body = "".join(f"<tr><td><b>{escape(k)}</b></td><td>{escape(str(v))}</td></tr>"
                   for k, v in rows if v != "")
    return f"<h3>{title}</h3><table>{body}</table>"

