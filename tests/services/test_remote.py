"""The warm `dagma run`'s client side when nothing answers."""

from pathlib import Path

import pytest

from dagma.services import remote
from dagma.services.config import ServicesConfig
from dagma.services.procs import free_port


def test_no_services_in_this_home_means_the_local_path(tmp_path: Path):
    assert remote.webserver(ServicesConfig(dagma_home=tmp_path)) is None


def test_a_webserver_that_does_not_answer_names_the_check_and_the_way_around():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(remote.RemoteRunError, match=r"did not answer.*services status.*--local"):
        remote.submit(url, ["wine_model"], {}, {})
