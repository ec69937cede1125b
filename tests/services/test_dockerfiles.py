"""Each service's Dockerfile is the shared template with its own name (they are built in the deploy issue)."""

from pathlib import Path

import pytest

SERVICES = Path(__file__).resolve().parents[2] / "services"
NAMES = sorted(p.parent.name for p in SERVICES.glob("*/server.py"))


@pytest.mark.parametrize("name", NAMES)
def test_every_service_has_a_dockerfile_running_it(name):
    text = (SERVICES / name / "Dockerfile").read_text()
    assert f'CMD ["python", "-m", "services.{name}"]' in text
    assert "USER 10001" in text and "torch==2.13.0" in text


def test_dockerfiles_differ_only_in_the_service_name():
    texts = {n: (SERVICES / n / "Dockerfile").read_text().replace(n, "NAME") for n in NAMES}
    assert len(set(texts.values())) == 1, "service Dockerfiles drifted apart"
