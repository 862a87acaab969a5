"""Programs that run on the isolated host, shipped verbatim in every bundle (stdlib only up
to the pipeline, Python 3.9 and newer): ``install.py`` (the one installer), ``hostlibs.py``,
``configure.py``, ``diarize.py``, ``smoke.py``, and ``transcript.py`` (speaker-labelled
transcripts, for a later ``bin/transcribe``). install.sh and `pyannote-bundle verify` run
the same files."""
