# make test counts cases from a line "N passed, M failed": print one.
def pytest_terminal_summary(terminalreporter):
    st = terminalreporter.stats
    n = lambda k: len([r for r in st.get(k, []) if getattr(r, "when", "call") == "call" or k != "passed"])
    terminalreporter.write_line("%d passed, %d failed, %d skipped" % (n("passed"), n("failed") + len(st.get("error", [])), len(st.get("skipped", []))))
