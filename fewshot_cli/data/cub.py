"""CUB-200-2011 (Wah et al. 2011) with the few-shot class split of Chen et al. 2019.

200 bird species, 11788 photos (41-60 per class), read by the folder reader from
``dataset.root/CUB_200_2011/images/<NNN.Species>/*.jpg``. When that folder is missing, the
official ``CUB_200_2011.tgz`` in ``dataset.root`` is md5-checked and extracted; when that is
missing too and ``dataset.download=true``, it is downloaded from Caltech DATA first.

Split (Chen et al., "A Closer Look at Few-shot Classification", ICLR 2019; their repository's
``filelists/CUB/write_CUB_filelist.py``): the 200 class folders sorted by name, class ``i``
(from 0) is train ("base") when ``i % 2 == 0``, val when ``i % 4 == 1``, test ("novel") when
``i % 4 == 3``: 100/50/50 classes.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from fewshot_cli.data.download import download_checked, md5_of
from fewshot_cli.data.folder import Folder
from fewshot_cli.errors import FewshotError

log = logging.getLogger(__name__)

# The official archive: Caltech DATA record 65de6-vp158 (it replaced the vision.caltech.edu
# address that Chen et al.'s download_CUB.sh used); the md5 that torchvision-style readers check.
URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
MD5 = "97eceeb196236b17998738112f37df78"
ARCHIVE = "CUB_200_2011.tgz"
FOLDER = "CUB_200_2011"
CLASSES = 200
WHERE = (f"download {ARCHIVE} from https://data.caltech.edu/records/65de6-vp158 (md5 {MD5}) "
         "into dataset.root")


def _fetch(url: str, dest: Path) -> None:
    """Download ``url`` into ``dest`` (tests replace this: they have no network)."""
    from torchvision.datasets.utils import download_url  # follows redirects, shows progress

    download_url(url, str(dest.parent), dest.name)


class CUB(Folder):
    """CUB-200-2011 birds, Chen et al.'s 100/50/50 class split, colour images."""

    def __init__(self, root: str, image_size: int = 84, channels: int | None = 3,
                 min_images: int = 1, download: bool = True,
                 allow_duplicates: bool = False) -> None:
        super().__init__(root, image_size=image_size, channels=channels, min_images=min_images,
                         allow_duplicates=allow_duplicates)
        self.download = bool(download)

    def present(self) -> bool:
        return (self.root / FOLDER / "images").is_dir() or (self.root / ARCHIVE).is_file()

    def images_root(self) -> Path:
        """``root/CUB_200_2011/images``, extracted (and downloaded) first when missing."""
        images = self.root / FOLDER / "images"
        if images.is_dir():
            return images
        archive = self.root / ARCHIVE
        if not archive.is_file():
            if not self.download:
                raise FewshotError(f"CUB-200-2011 is not in dataset.root={self.root} and "
                                   f"dataset.download=false; {WHERE}")
            download_checked(URL, archive, MD5, _fetch, "CUB-200-2011", WHERE)
        elif md5_of(archive) != MD5:
            raise FewshotError(f"{archive} is not the official archive (its md5 is not {MD5}); "
                               f"delete it, then {WHERE} or set dataset.download=true to have "
                               "it fetched")
        log.info("extracting %s into %s once", archive, self.root)
        scratch = Path(tempfile.mkdtemp(prefix=".cub-", dir=self.root))
        try:
            from torchvision.datasets.utils import extract_archive

            extract_archive(str(archive), str(scratch))
            if not (scratch / FOLDER / "images").is_dir():
                raise FewshotError(f"{archive} holds no {FOLDER}/images folder; delete it and "
                                   f"{WHERE}")
            os.replace(scratch / FOLDER, self.root / FOLDER)  # never a half-extracted folder
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return images

    def split_rule(self, names: list[str]) -> dict[str, list[str]]:
        """Chen et al.'s split by each class's index in name order."""
        names = sorted(names)
        if len(names) != CLASSES:
            log.warning("%s holds %d classes, not CUB's %d: the split is not Chen et al.'s",
                        self.root, len(names), CLASSES)
        return {"train": names[0::2], "val": names[1::4], "test": names[3::4]}
