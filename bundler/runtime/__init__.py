"""Programs that run on the isolated host, shipped verbatim in every bundle (stdlib only up
to the pipeline, Python 3.9 and newer). install.sh and `pyannote-bundle verify` run the
same files.

The programs: ``install.py`` (the one installer, a single file), ``hostlibs.py``,
``configure.py``, ``smoke.py``, ``diarize.py`` and ``transcribe.py`` (``bin/diarize``,
``bin/transcribe``), ``serve.py`` (``bin/serve``, the service, with its rooms
``service.py``, ``worker.py``, ``jobstore.py`` (and ``pgstore.py``, its PostgreSQL engine),
``responses.py`` and ``uploads.py``), ``export.py`` (the installer's ONNX export), and
``apply.py`` (a delta's, a single file). What the programs that process recordings share, a
room each:
``recordings.py`` (the per-file loop and its options), ``offline.py`` (offline environment,
network audit), ``inputs.py`` (files, shards), ``audio.py`` (decoding), ``devices.py``,
``outputs.py`` (names, RTTM, atomic writes), ``exits.py`` (exit codes), ``engines.py``
(``--engine``), ``transcript.py`` (words to speakers, transcript formats) and ``common.py``
(hash a file, write atomically, show a name, usable cores). ``_bootstrap.py`` lets a program
run as a file import its siblings as the tool imports them."""
