"""The inspector wing: what a recurrent state holds, and experiments on it (no Gradio, no plotting).

    recording.py  the shared chunked read with an observer (every recording and experiment)
    vector.py     RWKV-4's vector state: the recording (aa, bb, pp per token), closed-form attention
    matrix.py     RWKV-5/6/7's matrix state: the recording, replayed states, exact attention per head
    knockouts.py  RWKV-4's knock-outs, causal trace, logit lens, memory probe (the Experiments tab)
    patching.py   every architecture: restore, sweep, remove a token, blend, knock-outs, two models
    session.py    one visitor's inspector (the recording and the last result, in the memory budget)

The names of the old flat modules (`rwkv_playground.inspection` = this package,
`rwkv_playground.matrix_inspection`, `rwkv_playground.experiments`, `rwkv_playground.patching`)
keep working (see rwkv_playground/__init__.py).
"""

from .matrix import MatrixRecording, record_matrix, record_matrix_task  # noqa: F401
from .recording import read_observed  # noqa: F401
from .session import InspectorSession, approximate_nbytes  # noqa: F401
from .vector import (Recording, compare_states, decay_per_token, effective_attention, half_life,  # noqa: F401
                     model_decay_parameters, record, record_task, require_inspector, require_vector_views)
