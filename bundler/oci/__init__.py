"""OCI images as a library the ``image`` pipeline uses: ``archive`` writes archives and
layers, ``reader`` reads and checks layouts and archives, ``rootfs`` stages a root file
system from layers, ``base`` provides base images (the default one and a site's).

Nothing here imports the pipeline (``bundler.image``)."""

from bundler.oci import archive, base, reader, rootfs

__all__ = ["archive", "base", "reader", "rootfs"]
