"""Pattern fusions over the traced decoder graph (onnxscript rewrite rules)."""
