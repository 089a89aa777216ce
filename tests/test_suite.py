"""The suite's own scheduling under `-n 2`: tests sharing a module-scoped fixture run in one test process (so its
runs happen once), in conftest.py's longest-first order."""
import sys

from conftest import LONGEST_FIRST, ROOT, run

# collects two modules in a fresh pytest (as the README's command does) and prints each test's group
SHOW_GROUPS = """
import sys, pytest
class Show:
    def pytest_collection_finish(self, session):
        print("dist", session.config.getoption("dist"), session.config.getoption("loadscopereorder"))
        for item in session.items:
            group = item.get_closest_marker("xdist_group")
            print(group.args[0] if group else "-", item.nodeid)
pytest.main(["--collect-only", "-q", "-n", "2", *sys.argv[1:]], plugins=[Show()])
"""


def test_tests_sharing_a_module_fixture_share_a_test_process():
    proc = run([sys.executable, "-c", SHOW_GROUPS, "tests/test_sharding_stage3.py", "tests/test_distributed.py",
                "tests/test_training.py", "tests/test_lora.py"])
    lines = [line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith(("-", "test_", "dist"))]
    assert ["dist", "loadgroup False"] in lines  # groups in conftest.py's order, not reordered by size
    groups = {nodeid.split("::")[1].split("[")[0]: group for group, nodeid in lines if "::" in nodeid}
    # the stage-3 runs fixture: one group; the tests launching their own runs: free for either process
    assert groups["test_stage3_trains_the_weights_of_data_parallel_and_checkpoints_the_whole_state"] == \
        groups["test_a_stage3_resume_continues_exactly"] == "test_sharding_stage3"
    assert groups["test_the_decoder_scripts_train_with_stage3"] == "-"
    assert groups["test_ranks_apart_for_longer_than_gloos_timeout_kill_nobody"] == "test_distributed"
    assert groups["test_two_process_launch"] == "-"
    # tests taking their run by name (request.getfixturevalue): their module's mark groups them
    assert groups["test_checkpoints_rotate_and_hold_weights_and_state"] == "test_training"
    assert groups["test_only_lora_trains"] == "test_lora"
    # the longest work first: the distributed group (its gloo-timeout test waits over a minute) before stage 3's
    order = [group for group, _ in lines if group.startswith("test_")]
    assert order.index("test_distributed") < order.index("test_sharding_stage3")
    assert all(name.endswith(".py::") or (ROOT / "tests" / name.split("::")[0]).is_file() for name in LONGEST_FIRST)


def test_a_group_runs_in_one_test_process():
    """With two test processes, the tests sharing a module-scoped fixture (here 5 in-process ones) all run in one."""
    proc = run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "-v",
                "tests/test_bad_input.py", "-k", "do_not_belong_together"])
    workers = {line.split()[0] for line in proc.stdout.splitlines() if line.startswith("[gw") and "PASSED" in line}
    assert len(workers) == 1, proc.stdout[-3000:]
