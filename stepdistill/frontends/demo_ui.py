"""The demo's Gradio app and its command (``stepdistill demo``, ``python app.py``): widgets, event wiring,
launch. The computation it shows lives in :mod:`stepdistill.frontends.demo` (no gradio needed there): model
folders, label and hybrid validation, :func:`~stepdistill.frontends.demo.generate` and its teacher / student runs.
"""
from __future__ import annotations

import os
import sys

from .demo import (ALL_CLASSES, COMPILE, DEFAULT_STUDENT, DEFAULT_TEACHER, DemoInputError, GenerateResult, HYBRID_CAPTION,
                    HYBRID_DEFAULTS, HYBRID_HANDOFFS, MAX_BATCH, MAX_GUIDANCE, MAX_HYBRID_SUBSTEPS, MAX_SEED,
                    MAX_STREAM_FRAMES, MAX_TEACHER_STEPS, SAMPLERS, _int_in, hybrid_compatible, hybrid_settings,
                    plan_generation, read_model_info, run_student, stream_video, student_nfe, student_supports_hybrid,
                    student_supports_hybrid_chain, teacher_progress)


def _ui_state(teacher_path: str, student_path: str) -> dict:
    """Widget settings for the given folders (never raises: problems go into ``message``)."""
    st = {"classes": [ALL_CLASSES], "class_visible": True, "prompt_visible": False, "K": 1, "hybrid": False,
          "hybrid_full": False, "message": ""}
    msgs, tinfo, sinfo = [], None, None
    try:
        tinfo = read_model_info(teacher_path, "teacher")
    except DemoInputError as e:
        msgs.append(f"⚠️ {e}")
    try:
        sinfo = read_model_info(student_path, "student")
        if not sinfo.max_student_steps:
            msgs.append(f"⚠️ student folder {str(sinfo.path)!r} has no student_timesteps (not a distilled student)")
    except DemoInputError as e:
        msgs.append(f"⚠️ {e}")
    info = sinfo or tinfo
    if info is not None:
        st["class_visible"] = info.conditioning == "class"
        st["prompt_visible"] = info.conditioning == "text"
        st["classes"] = [ALL_CLASSES, *info.class_names]
    if sinfo is not None:
        st["K"] = max(1, sinfo.max_student_steps)
        st["hybrid"] = (tinfo is not None and sinfo.max_student_steps > 1 and sinfo.conditioning != "text"
                        and student_supports_hybrid(sinfo)
                        and hybrid_compatible(tinfo, sinfo) is None)  # one step: the teacher would take all of it
        st["hybrid_full"] = st["hybrid"] and student_supports_hybrid_chain(sinfo)
        ts = ", ".join(f"{t:g}" for t in sinfo.student_timesteps or [])
        desc = f"student: {sinfo.method or 'distilled'}, {sinfo.max_student_steps} step(s) (t = {ts})"
        if sinfo.experts:
            desc += f", {len(sinfo.experts)} experts"
        if sinfo.max_student_steps == 1 and sinfo.conditioning == "class":
            desc += " · hybrid sampling needs a multi-step student, e.g. builtin:animal_mnist_dmd2_4step"
        msgs.insert(0, desc)
        if tinfo is not None and (why := hybrid_compatible(tinfo, sinfo)):
            msgs.append(f"⚠️ teacher/student mismatch: {why}")
        elif st["hybrid"] and not st["hybrid_full"]:
            msgs.append("note: hybrid with this student (Phased DMD / multi-student) lets the teacher take 1 step "
                        "with the renoise hand-off only (teacher steps and hand-off are fixed)")
    st["message"] = "  \n".join(msgs)
    return st


def build_demo(teacher_path: str = DEFAULT_TEACHER, student_path: str = DEFAULT_STUDENT):
    """The Gradio app (a ``gr.Blocks``); ``.launch()`` it or use :func:`launch`."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    st = _ui_state(teacher_path, student_path)
    with gr.Blocks(title="stepdistill: teacher vs. student", analytics_enabled=False) as demo:
        gr.Markdown("## stepdistill — teacher vs. distilled student\n"
                    "Same seed and classes: the teacher samples with many steps and classifier-free guidance, "
                    "the student in 1..K steps. NFE = network evaluations per batch.")
        with gr.Row():
            teacher_box = gr.Textbox(value=str(teacher_path), label="Teacher folder",
                                     info="diffusers folder or builtin:animal_mnist")
            student_box = gr.Textbox(value=str(student_path), label="Student folder",
                                     info="diffusers folder, builtin:animal_mnist_dmd2 (1 step) or "
                                          "builtin:animal_mnist_dmd2_4step (4 steps: hybrid mode)")
        model_md = gr.Markdown(st["message"])
        with gr.Row():
            class_dd = gr.Dropdown(choices=st["classes"], value=ALL_CLASSES, label="Class", elem_id="class",
                                   allow_custom_value=True, visible=st["class_visible"])
            prompt_box = gr.Textbox(value="", label="Prompt", visible=st["prompt_visible"], elem_id="prompt",
                                     placeholder="e.g. a drawing of a cat")
            seed_in = gr.Number(value=0, precision=0, label=f"Seed (0..{MAX_SEED})", elem_id="seed")
            batch_in = gr.Number(value=4, precision=0, label=f"Batch size (1..{MAX_BATCH})")
        with gr.Row():
            sstep_in = gr.Number(value=st["K"], precision=0, label=f"Student steps (1..{st['K']})")
            tstep_in = gr.Number(value=50, precision=0, label=f"Teacher steps (1..{MAX_TEACHER_STEPS})",
                                 elem_id="teacher-steps")
            cfg_in = gr.Number(value=2.0, label=f"Teacher guidance scale (0..{MAX_GUIDANCE:g}; 1 = no CFG)")
            sampler_dd = gr.Dropdown(choices=list(SAMPLERS), value="ddim", label="Teacher sampler",
                                     allow_custom_value=True)
            hybrid_cb = gr.Checkbox(value=False, label="Hybrid: teacher takes the first student step(s)",
                                    visible=st["hybrid"])
        hd = dict(HYBRID_DEFAULTS) if st["hybrid_full"] else {**HYBRID_DEFAULTS, "steps": 1, "handoff": "renoise"}
        with gr.Row(visible=st["hybrid"]) as hybrid_row:
            hsteps_in = gr.Number(value=hd["steps"], precision=0, label="Hybrid: teacher steps n (1..student steps)",
                                  interactive=st["hybrid_full"])
            hsub_in = gr.Number(value=hd["substeps"], precision=0,
                                label=f"Hybrid: teacher DDIM sub-steps m per step (1..{MAX_HYBRID_SUBSTEPS})")
            hhand_dd = gr.Dropdown(choices=list(HYBRID_HANDOFFS), value=hd["handoff"], label="Hybrid: hand-off",
                                   allow_custom_value=True, interactive=st["hybrid_full"])
            hcfg_in = gr.Number(value=hd["guidance_scale"],
                                label=f"Hybrid: teacher guidance scale (0..{MAX_GUIDANCE:g}; 1 = no CFG, best)")
        hybrid_md = gr.Markdown(HYBRID_CAPTION + "  \n" + hybrid_nfe_caption(st["K"], False, hd["steps"], hd["substeps"],
                                                                             hd["guidance_scale"]),
                                visible=st["hybrid"])
        go = gr.Button("Generate", variant="primary", elem_id="generate")
        status = gr.Markdown("", elem_id="status")
        with gr.Row():
            with gr.Column():
                t_gal = gr.Gallery(label="Teacher", columns=4, format="png", height="auto", elem_id="teacher-gallery")
                t_txt = gr.Textbox(label="Teacher: NFE and time", interactive=False, elem_id="teacher-text")
            with gr.Column():
                s_gal = gr.Gallery(label="Student", columns=4, format="png", height="auto", elem_id="student-gallery")
                s_txt = gr.Textbox(label="Student: NFE and time", interactive=False, elem_id="student-text")

        def on_generate(tp, sp, cls, prompt, seed, bs, ss, ts, w, sampler, hyb, hn, hm, hh, hw):
            # outputs: teacher gallery, teacher text, student gallery, student text, status
            yield [], "", [], "", "⏳ sampling…"  # old images and status go at once (also when the input is bad)
            try:
                plan = plan_generation(tp, sp, cls, prompt, seed, bs, ss, ts, w, sampler, bool(hyb), hn, hm, hh, hw)
                s_run = run_student(plan)  # fast: shown before the teacher starts
            except DemoInputError as e:
                print(f"stepdistill demo: rejected input: {e}", file=sys.stderr, flush=True)  # one line, no traceback
                yield [], "", [], "", ""
                raise gr.Error(str(e), print_exception=False) from None
            yield ([], f"teacher: 0/{plan.teacher_steps} steps…", s_run.gallery(), s_run.summary,
                   "student done; the teacher is sampling…")
            for item in teacher_progress(plan):
                if isinstance(item, str):
                    yield gr.skip(), item, gr.skip(), gr.skip(), gr.skip()
                else:
                    t_run = item
            # every output in the last update: API clients (gradio_client) read the final values
            yield t_run.gallery(), t_run.summary, s_run.gallery(), s_run.summary, GenerateResult(t_run, s_run).status

        go.click(on_generate, inputs=[teacher_box, student_box, class_dd, prompt_box, seed_in, batch_in, sstep_in,
                                      tstep_in, cfg_in, sampler_dd, hybrid_cb, hsteps_in, hsub_in, hhand_dd, hcfg_in],
                 outputs=[t_gal, t_txt, s_gal, s_txt, status], api_name="generate", concurrency_limit=1)

        def on_hybrid_settings(ss, hyb, hn, hm, hw):
            return gr.update(value=HYBRID_CAPTION + "  \n" + hybrid_nfe_caption(ss, bool(hyb), hn, hm, hw))

        gr.on([sstep_in.change, hybrid_cb.change, hsteps_in.change, hsub_in.change, hcfg_in.change], on_hybrid_settings,
              inputs=[sstep_in, hybrid_cb, hsteps_in, hsub_in, hcfg_in], outputs=[hybrid_md], api_visibility="private")

        def on_models(tp, sp, cls):
            s = _ui_state(tp, sp)
            return (gr.update(value=s["message"]),
                    gr.update(choices=s["classes"], visible=s["class_visible"],
                              value=cls if cls in s["classes"] else ALL_CLASSES),
                    gr.update(visible=s["prompt_visible"]),
                    gr.update(label=f"Student steps (1..{s['K']})", value=s["K"]),
                    gr.update(visible=s["hybrid"], value=False),
                    gr.update(visible=s["hybrid"]),
                    gr.update(visible=s["hybrid"]),
                    gr.update(interactive=s["hybrid_full"], value=HYBRID_DEFAULTS["steps"] if s["hybrid_full"] else 1),
                    gr.update(interactive=s["hybrid_full"],
                              value=HYBRID_DEFAULTS["handoff"] if s["hybrid_full"] else "renoise"))

        with gr.Accordion("Video: stream a clip from a video student", open=False, elem_id="video-section"):
            gr.Markdown("A causal or streaming student (`method: self_forcing`) shows each frame as soon as its chunk "
                        "is final; a DMD2 video student makes the whole clip at once.")
            with gr.Row():
                v_box = gr.Textbox(value="", label="Video student folder", elem_id="video-student",
                                   placeholder="runs/video/stream/student")
                v_prompt = gr.Textbox(value="a cat", label="Prompt", elem_id="video-prompt")
                v_seed = gr.Number(value=0, precision=0, label=f"Seed (0..{MAX_SEED})")
                v_frames = gr.Number(value=0, precision=0, label=f"Frames (0 = the clip length; up to "
                                                                 f"{MAX_STREAM_FRAMES})")
            v_go = gr.Button("Stream", elem_id="video-stream")
            with gr.Row():
                v_frame = gr.Image(label="Current frame", type="pil", elem_id="video-frame", height=256)
                v_strip = gr.Image(label="Frames so far", type="pil", elem_id="video-strip")
            v_txt = gr.Textbox(label="Frames and time", interactive=False, elem_id="video-text")

        def on_stream(path, prompt, seed, frames):
            yield None, None, "⏳ streaming…"
            try:
                for sf in stream_video(path, prompt, seed, frames):
                    yield sf.frame, sf.strip, sf.summary
            except DemoInputError as e:
                print(f"stepdistill demo: rejected input: {e}", file=sys.stderr, flush=True)
                yield None, None, ""
                raise gr.Error(str(e), print_exception=False) from None

        v_go.click(on_stream, inputs=[v_box, v_prompt, v_seed, v_frames], outputs=[v_frame, v_strip, v_txt],
                   api_name="stream_video", concurrency_limit=1)

        gr.on([teacher_box.submit, teacher_box.blur, student_box.submit, student_box.blur], on_models,
              inputs=[teacher_box, student_box, class_dd],
              outputs=[model_md, class_dd, prompt_box, sstep_in, hybrid_cb, hybrid_row, hybrid_md, hsteps_in, hhand_dd],
              api_visibility="private")
    return demo


def hybrid_nfe_caption(student_steps, hybrid: bool, hybrid_steps, hybrid_substeps, hybrid_guidance,
                       conditioned: bool = True) -> str:
    """One line for the UI: the student's NFE per image with the hybrid settings (never raises)."""
    try:
        k = _int_in(student_steps, "student steps", 1, 10**6)
        n, m, _, w, _ = hybrid_settings(k, hybrid_steps, hybrid_substeps, "ode", hybrid_guidance)
    except DemoInputError as e:
        return f"⚠️ {e}"
    nfe = student_nfe(k, True, w, n, m, conditioned)
    cfg = conditioned and w != 1.0
    line = f"Hybrid NFE per image = {n}·{m}·{2 if cfg else 1} + ({k} − {n}) = {nfe} (plain student: {k})"
    return line if hybrid else line + " — tick Hybrid to use it"


def offline_theme():
    """Default theme with system fonts only (the stock theme may link Google Fonts)."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])


#: a new Generate click closes the error toasts of the previous one (they would otherwise stay up for 10 s, over a
#: valid run's results)
CLEAR_TOASTS_JS = """<script>
window.__stepdistillToasts = true;
document.addEventListener('click', (e) => {
  if (!e.target.closest || !e.target.closest('#generate')) return;
  document.querySelectorAll('.toast-body').forEach((t) => {
    const c = t.querySelector('.toast-close');
    if (c) { c.click(); } else { t.remove(); }
  });
}, true);
</script>"""


def launch(host: str = "127.0.0.1", port: int | None = None, teacher: str = DEFAULT_TEACHER,
           student: str = DEFAULT_STUDENT, **launch_kwargs):
    """Build and serve the demo (blocks unless ``prevent_thread_lock=True``); returns the Blocks."""
    demo = build_demo(teacher, student)
    kw = dict(server_name=host, server_port=port, share=False, ssr_mode=False, theme=offline_theme(),
              head=CLEAR_TOASTS_JS)
    kw.update(launch_kwargs)
    demo.launch(**kw)
    return demo


# -- command line ---------------------------------------------------------------------------------
def add_demo_args(p) -> None:
    p.add_argument("--teacher", default=DEFAULT_TEACHER, help="teacher folder or builtin name (default %(default)s)")
    p.add_argument("--student", default=DEFAULT_STUDENT, help="student folder or builtin name (default %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=None, help="port (default: gradio's, 7860 or the next free one)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each loaded network (opt-in: the first Generate per model compiles)")
    p.add_argument("--share", action="store_true",
                   help="also serve on a public *.gradio.live link for 72 hours (needs internet; off by default)")
    from .cli_tools import threads_arg

    threads_arg(p)


def cmd_demo(a) -> None:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SystemExit("the demo needs gradio: pip install 'stepdistill[demo]'") from None
    from .cli_tools import _set_threads

    _set_threads(a)
    COMPILE["on"] = bool(getattr(a, "compile", False))
    for line in _ui_state(a.teacher, a.student)["message"].splitlines():
        if "⚠️" in line:  # still start: other folders can be entered in the UI
            print(f"warning: {line.replace('⚠️', '').strip()}", file=sys.stderr)
    launch(host=a.host, port=a.port, teacher=a.teacher, student=a.student, share=bool(getattr(a, "share", False)))


def add_demo_command(sub) -> None:
    """Register ``stepdistill demo`` on the CLI's sub-parsers (``argparse`` ``add_subparsers()`` result)."""
    p = sub.add_parser("demo", help="Gradio demo: teacher vs. student side by side (offline, 127.0.0.1)")
    add_demo_args(p)
    p.set_defaults(fn=cmd_demo)
