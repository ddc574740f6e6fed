"""The bundled demo model's corpus and training (not imported by the app or the engine).

    python -m tools.demo_model.train --out assets          # download, tokenize, train (resumable)
    python -m tools.demo_model.train --out assets --eval   # re-measure the shipped model
"""
