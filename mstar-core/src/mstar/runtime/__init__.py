"""The roles of a deployment, the boxes of the runtime diagram in `docs/runtime.md`.

`frontend` (the data worker: the model's `process_prompt` and `postprocess`), `conductor`
(admission, walk by walk), `worker` (one per rank: runs nodes through the engines, built
by `builder`, sequences moved by `migration`, streams cut by `chunker`). `wiring` builds
every role the same way for both ways of running them: as threads of one process
(`local`, behind `mstar.load`) or one process each (`mstar.serving`).
"""
