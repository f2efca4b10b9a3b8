"""Chat data (data.dataset = "chat"): records -> rendered -> masked -> packed.

  source.py    JSONL / HF / embedded chat sample -> Documents (build_chat_source)
  records.py   one chat record validated and normalised (HF chat format)
  template.py  the checkpoint's chat template (jinja2 sandbox) or the built-in renderer
  harmony.py   the built-in harmony (gpt-oss) renderer, written from the format
  masks.py     trained tokens (data.loss_on) found from the token ids
  pack.py      WholeDocumentStream: one conversation per window document, overflow
  prepared.py  prepared chat folders: written by `prepare` (rendered, masked, overflow
               applied), read by offset into the same windows (PreparedChat)

Imports the data package's own modules (packing, readers, schema, sources) and runtime.errors;
nothing in runtime.data imports back into this package except loader.py (build_chat_source,
PreparedChat).
"""
