"""Second-level domains from DNS names, with the Public Suffix List that ships with ``publicsuffixlist``."""

from __future__ import annotations

from functools import lru_cache

from publicsuffixlist import PublicSuffixList

# ICANN section only: private suffixes (x.s3.amazonaws.com) would turn every cloud tenant into its own "SLD",
# which splits one vendor's cloud into thousands of features. Matches tldextract's default (REFERENCE.md).
_PSL = PublicSuffixList(only_icann=True)


@lru_cache(maxsize=65536)
def sld(name: str) -> str:
    """The registrable domain of ``name`` (``a.b.example.co.uk`` -> ``example.co.uk``).

    Names with no registrable part (``local``, ``arpa`` reverse names, bare suffixes) come back whole.
    """
    name = name.rstrip(".").lower()
    if not name:
        return ""
    return _PSL.privatesuffix(name) or name


def brand(registrable: str) -> str | None:
    """The first label of a registrable domain (``tplinkcloud.com.cn`` -> ``tplinkcloud``): a vendor's name under
    every country's suffix. None below four letters, where other owners' names are as likely (mi, jd, qq)."""
    label = registrable.split(".", 1)[0]
    return label if len(label) >= 4 else None
