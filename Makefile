# chatserve: make test | test-all | bench | run | interop
PYTHON ?= python3
VENV   ?= .venv-interop

.PHONY: test test-all bench run interop clean

test:
	$(PYTHON) -m unittest -q test_chatserve

# The suite under every Python 3.8+ found in PATH and in ~/.pyenv/versions.
test-all:
	@found=""; failed=""; \
	for py in $$( (for v in 3.8 3.9 3.10 3.11 3.12 3.13 3.14; do command -v python$$v; done; \
	              ls -d $$HOME/.pyenv/versions/3.*/bin/python3 2>/dev/null) | sort -u ); do \
	  ver=$$($$py -c 'import sys; print("%d.%d.%d" % sys.version_info[:3]) if sys.version_info >= (3, 8) else None' 2>/dev/null); \
	  case "$$ver" in ""|None) continue;; esac; \
	  case " $$found " in *" $$ver "*) continue;; esac; \
	  found="$$found $$ver"; echo "== Python $$ver ($$py)"; \
	  $$py -m unittest -q test_chatserve || failed="$$failed $$ver"; \
	done; \
	echo "Pythons found:$$found"; \
	if [ -z "$$found" ]; then echo "no Python 3.8+ found"; exit 1; fi; \
	if [ -n "$$failed" ]; then echo "FAILED under:$$failed"; exit 1; fi

bench:
	$(PYTHON) test_chatserve.py bench

run:
	$(PYTHON) chatserve.py serve

# The official SDKs against chatserve; a missing SDK is a failure here, never a skip.
interop: $(VENV)/.installed
	CHATSERVE_INTEROP=1 $(VENV)/bin/python -m unittest -v test_chatserve.InteropTest test_chatserve.AnthropicInteropTest

$(VENV)/.installed:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check openai anthropic
	touch $@

clean:
	rm -rf $(VENV) __pycache__
