"""The 11 custom DMControl tasks of TD-MPC2 (MT30 indices 19-29), kept in a registry of our own.

Each task subclasses the stock dm_control task of its domain, so initialisation, observations and the use of
the random stream are the stock ones except where the official task definition changes them. Constants carry
the official values.
"""
import numpy as np
from dm_control.rl import control
from dm_control.suite import ball_in_cup, base, cheetah, hopper, pendulum, reacher, walker
from dm_control.utils import rewards

from . import models

INF = float("inf")

# walker: 25 s at a control timestep of 0.025 s (4 physics steps of 0.0025 s)
WALKER_TIME_LIMIT, WALKER_CONTROL_TIMESTEP = 25, 0.025
WALKER_STAND_HEIGHT, WALKER_WALK_SPEED, WALKER_RUN_SPEED = 1.2, 1, 8
# cheetah: 10 s at the physics timestep of 0.01 s
CHEETAH_TIME_LIMIT, CHEETAH_JUMP_HEIGHT = 10, 1.2
CHEETAH_RUN_BACKWARDS_SPEED, CHEETAH_RUN_ONE_FOOT_SPEED, CHEETAH_JUMP_SPEED = 8, 6, 0.5
# hopper: 20 s at a control timestep of 0.02 s
HOPPER_TIME_LIMIT, HOPPER_CONTROL_TIMESTEP = 20, 0.02
HOPPER_STAND_HEIGHT, HOPPER_HOP_SPEED = 0.6, 2
# reacher: 20 s at the physics timestep of 0.02 s
REACHER_TIME_LIMIT, REACHER_BIG_TARGET, REACHER_SMALL_TARGET = 20, 0.05, 0.015
# ball in cup: 20 s at a control timestep of 0.02 s
CUP_TIME_LIMIT, CUP_CONTROL_TIMESTEP = 20, 0.02
CUP_SPIN_DISTANCE, CUP_SPIN_SPEED, CUP_OUT_OF_TARGET_INIT_PROB = 0.5, 6.0, 0.1
# pendulum: 20 s at the physics timestep of 0.02 s
PENDULUM_TIME_LIMIT, PENDULUM_SPIN_SPEED = 20, 9.0


class BackwardsPlanarWalker(walker.PlanarWalker):
    """Stock walker stand reward times a reward for moving in -x at `move_speed` or faster."""

    def get_reward(self, physics):
        standing = rewards.tolerance(physics.torso_height(), bounds=(WALKER_STAND_HEIGHT, INF),
                                     margin=WALKER_STAND_HEIGHT / 2)
        upright = (1 + physics.torso_upright()) / 2
        stand = (3 * standing + upright) / 4
        move = rewards.tolerance(physics.horizontal_velocity(), bounds=(-INF, -self._move_speed),
                                 margin=self._move_speed / 2, value_at_margin=0.5, sigmoid="linear")
        return stand * (5 * move + 1) / 6


def _high(z):
    return rewards.tolerance(z, bounds=(CHEETAH_JUMP_HEIGHT, INF), margin=CHEETAH_JUMP_HEIGHT / 2)


class CustomCheetah(cheetah.Cheetah):
    """Cheetah goals: run-backwards, run-front / run-back (run on the front / back legs), jump."""

    GOALS = ("run-backwards", "run-front", "run-back", "jump")

    def __init__(self, goal, move_speed, random=None):
        if goal not in self.GOALS:
            raise ValueError(f"unknown cheetah goal {goal!r}, expected one of {self.GOALS}")
        super().__init__(random=random)
        self._goal = goal
        self._move_speed = move_speed

    def _heights(self, physics, raised_foot):
        return physics.named.data.xpos["torso", "z"], physics.named.data.xpos[raised_foot, "z"]

    def _run_on_one_end(self, physics, raised_foot):
        torso_z, foot_z = self._heights(physics, raised_foot)
        up = (3 * _high(foot_z) + 2 * _high(torso_z)) / 5
        fast = rewards.tolerance(physics.speed(), bounds=(self._move_speed, INF), margin=self._move_speed,
                                 value_at_margin=0, sigmoid="linear")
        return up * (5 * fast + 1) / 6

    def _stand_on_one_end(self, physics, raised_foot):
        torso_z, foot_z = self._heights(physics, raised_foot)
        high = _high((torso_z + foot_z) / 2)
        still = rewards.tolerance(physics.speed(), bounds=(-self._move_speed, self._move_speed),
                                  margin=self._move_speed, value_at_margin=0, sigmoid="linear")
        return (5 * high + still) / 6

    def get_reward(self, physics):
        if self._goal == "run-backwards":
            return rewards.tolerance(physics.speed(), bounds=(-INF, -self._move_speed),
                                     margin=self._move_speed, value_at_margin=0, sigmoid="linear")
        if self._goal == "run-front":  # the back foot is the one in the air
            return self._run_on_one_end(physics, "bfoot")
        if self._goal == "run-back":
            return self._run_on_one_end(physics, "ffoot")
        # jump: standing on either end pays
        return (self._stand_on_one_end(physics, "bfoot") + self._stand_on_one_end(physics, "ffoot")) / 2


class HopBackwards(hopper.Hopper):
    """Stock hopper stand term times a reward for hopping in -x at HOPPER_HOP_SPEED/2 or faster."""

    def get_reward(self, physics):
        standing = rewards.tolerance(physics.height(), (HOPPER_STAND_HEIGHT, 2))
        hopping = rewards.tolerance(physics.speed(), bounds=(-INF, -HOPPER_HOP_SPEED / 2),
                                    margin=HOPPER_HOP_SPEED / 4, value_at_margin=0.5, sigmoid="linear")
        return standing * hopping


class CupSpin(ball_in_cup.BallInCup):
    """Swing the ball around the cup fast and far from it, rather than catching it."""

    def initialize_episode(self, physics):
        # Start with the ball inside the cup, except in 10% of the episodes (one draw, before the search loop,
        # to consume the random stream exactly as the official task does).
        out_of_target_ok = self.random.uniform() < CUP_OUT_OF_TARGET_INIT_PROB
        penetrating, valid = True, False
        while penetrating or not valid:
            physics.named.data.qpos["ball_x"] = self.random.uniform(-0.2, 0.2)
            physics.named.data.qpos["ball_z"] = self.random.uniform(0.2, 0.5)
            physics.after_reset()
            penetrating = physics.data.ncon > 0
            valid = bool(physics.in_target()) or out_of_target_ok
        base.Task.initialize_episode(self, physics)  # skip the stock ball-placement loop

    def get_reward(self, physics):
        dist = rewards.tolerance(np.linalg.norm(physics.ball_to_target()), bounds=(CUP_SPIN_DISTANCE, INF),
                                 margin=CUP_SPIN_DISTANCE / 2, value_at_margin=0.5, sigmoid="linear")
        ball_speed = np.linalg.norm(np.abs(physics.named.data.qvel[["ball_x", "ball_z"]]))
        vel = rewards.tolerance(ball_speed, bounds=(CUP_SPIN_SPEED, INF), margin=CUP_SPIN_SPEED / 2,
                                value_at_margin=0.5, sigmoid="linear")
        return (1 - physics.in_target()) * (dist + 2 * vel) / 3


class PendulumSpin(pendulum.SwingUp):
    """Stock swing-up initialisation; reward for spinning at PENDULUM_SPIN_SPEED rad/s or faster."""

    def get_reward(self, physics):
        speed = np.linalg.norm(physics.angular_velocity())
        return rewards.tolerance(speed, bounds=(PENDULUM_SPIN_SPEED, INF), margin=PENDULUM_SPIN_SPEED / 2,
                                 value_at_margin=0.5, sigmoid="linear")


def _env(physics, task, time_limit, control_timestep=None, environment_kwargs=None):
    kwargs = dict(environment_kwargs or {})
    if control_timestep is not None:
        kwargs["control_timestep"] = control_timestep
    return control.Environment(physics, task, time_limit=time_limit, **kwargs)


def _walker(move_speed):
    def build(time_limit=WALKER_TIME_LIMIT, random=None, environment_kwargs=None):
        physics = walker.Physics.from_xml_string(*models.walker_long_floor())
        task = BackwardsPlanarWalker(move_speed=move_speed, random=random)
        return _env(physics, task, time_limit, WALKER_CONTROL_TIMESTEP, environment_kwargs)
    return build


def _cheetah(goal, move_speed):
    def build(time_limit=CHEETAH_TIME_LIMIT, random=None, environment_kwargs=None):
        physics = cheetah.Physics.from_xml_string(*models.cheetah_long_ground())
        return _env(physics, CustomCheetah(goal, move_speed, random=random), time_limit,
                    environment_kwargs=environment_kwargs)
    return build


def _hop_backwards(time_limit=HOPPER_TIME_LIMIT, random=None, environment_kwargs=None):
    physics = hopper.Physics.from_xml_string(*hopper.get_model_and_assets())
    return _env(physics, HopBackwards(hopping=True, random=random), time_limit, HOPPER_CONTROL_TIMESTEP,
                environment_kwargs)


def _reacher_three(target_size):
    def build(time_limit=REACHER_TIME_LIMIT, random=None, environment_kwargs=None):
        physics = reacher.Physics.from_xml_string(*models.reacher_three_links())
        return _env(physics, reacher.Reacher(target_size, random=random), time_limit,
                    environment_kwargs=environment_kwargs)
    return build


def _cup_spin(time_limit=CUP_TIME_LIMIT, random=None, environment_kwargs=None):
    physics = ball_in_cup.Physics.from_xml_string(*ball_in_cup.get_model_and_assets())
    return _env(physics, CupSpin(random=random), time_limit, CUP_CONTROL_TIMESTEP, environment_kwargs)


def _pendulum_spin(time_limit=PENDULUM_TIME_LIMIT, random=None, environment_kwargs=None):
    physics = pendulum.Physics.from_xml_string(*pendulum.get_model_and_assets())
    return _env(physics, PendulumSpin(random=random), time_limit, environment_kwargs=environment_kwargs)


# (dm_control domain, task) -> builder with the suite's signature (time_limit, random, environment_kwargs)
CUSTOM_TASKS = {
    ("walker", "walk_backwards"): _walker(WALKER_WALK_SPEED),
    ("walker", "run_backwards"): _walker(WALKER_RUN_SPEED),
    ("cheetah", "run_backwards"): _cheetah("run-backwards", CHEETAH_RUN_BACKWARDS_SPEED),
    ("cheetah", "run_front"): _cheetah("run-front", CHEETAH_RUN_ONE_FOOT_SPEED),
    ("cheetah", "run_back"): _cheetah("run-back", CHEETAH_RUN_ONE_FOOT_SPEED),
    ("cheetah", "jump"): _cheetah("jump", CHEETAH_JUMP_SPEED),
    ("hopper", "hop_backwards"): _hop_backwards,
    ("reacher", "three_easy"): _reacher_three(REACHER_BIG_TARGET),
    ("reacher", "three_hard"): _reacher_three(REACHER_SMALL_TARGET),
    ("ball_in_cup", "spin"): _cup_spin,
    ("pendulum", "spin"): _pendulum_spin,
}
