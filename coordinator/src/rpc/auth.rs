//! `etcdserverpb.Auth`: users, roles, permissions, the auth switch and `Authenticate`.
//!
//! Writes become [`AuthCmd`]s proposed like any other command (passwords are hashed here,
//! before proposing). While auth is enabled every call but `Authenticate`, `AuthStatus` and
//! `AuthEnable` needs root, except that a user may read itself (`UserGet`) and the roles it
//! holds (`RoleGet`), as in etcd.

use proto::authpb;
use proto::etcdserverpb::auth_server::Auth;
use proto::etcdserverpb::{
    AuthDisableRequest, AuthDisableResponse, AuthEnableRequest, AuthEnableResponse,
    AuthRoleAddRequest, AuthRoleAddResponse, AuthRoleDeleteRequest, AuthRoleDeleteResponse,
    AuthRoleGetRequest, AuthRoleGetResponse, AuthRoleGrantPermissionRequest,
    AuthRoleGrantPermissionResponse, AuthRoleListRequest, AuthRoleListResponse,
    AuthRoleRevokePermissionRequest, AuthRoleRevokePermissionResponse, AuthStatusRequest,
    AuthStatusResponse, AuthUserAddRequest, AuthUserAddResponse, AuthUserChangePasswordRequest,
    AuthUserChangePasswordResponse, AuthUserDeleteRequest, AuthUserDeleteResponse,
    AuthUserGetRequest, AuthUserGetResponse, AuthUserGrantRoleRequest, AuthUserGrantRoleResponse,
    AuthUserListRequest, AuthUserListResponse, AuthUserRevokeRoleRequest,
    AuthUserRevokeRoleResponse, AuthenticateRequest, AuthenticateResponse,
};
use tonic::{Request, Response, Status};

use super::Ctx;
use crate::auth::store::MAX_NAME_BYTES;
use crate::auth::{AuthCmd, Caller, Perm, PermKind, new_secret};
use crate::command::Command;
use crate::error::{Error, Result};
use crate::state::Response as SmResponse;

/// The Auth service.
#[derive(Clone)]
pub struct AuthService {
    ctx: Ctx,
}

fn check_name(name: &str, empty: Error) -> Result<()> {
    if name.is_empty() {
        return Err(empty);
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(Error::InvalidArgument(format!(
            "name is too long (at most {MAX_NAME_BYTES} bytes)"
        )));
    }
    Ok(())
}

fn no_prehashed(h: &str) -> Result<()> {
    if h.is_empty() {
        Ok(())
    } else {
        Err(Error::InvalidArgument(
            "pre-hashed passwords are not accepted; send the password".into(),
        ))
    }
}

impl AuthService {
    /// Wrap a context.
    pub fn new(ctx: Ctx) -> AuthService {
        AuthService { ctx }
    }

    /// The caller, who must be root while auth is enabled.
    fn root<T>(&self, req: &Request<T>) -> Result<Caller> {
        let caller = self.ctx.auth.caller_of(req)?;
        caller.root()?;
        Ok(caller)
    }

    /// Propose an auth change; the store revision for the header.
    async fn propose(&self, caller: &Caller, cmd: AuthCmd) -> Result<i64> {
        let applied = self
            .ctx
            .member
            .propose(caller.wrap(Command::Auth(cmd)))
            .await?;
        match applied.result? {
            SmResponse::Auth { .. } => Ok(applied.revision),
            _ => Err(Error::InvalidArgument(
                "unexpected response to an auth change".into(),
            )),
        }
    }

    fn rev(&self) -> i64 {
        self.ctx.state.read().revision()
    }

    async fn authenticate(&self, r: AuthenticateRequest) -> Result<AuthenticateResponse> {
        // See every change acknowledged before this call, whichever member took it.
        self.ctx.member.read_barrier().await?;
        if !self.ctx.auth.enabled() {
            return Err(Error::AuthNotEnabled);
        }
        if r.name.is_empty() || r.name.len() > MAX_NAME_BYTES {
            return Err(Error::AuthFailed);
        }
        let (hash, cred) = {
            let st = self.ctx.state.read();
            match st.auth().users().get(&r.name) {
                Some(u) => (u.hash.clone(), u.cred_revision),
                None => (None, 0),
            }
        };
        if r.password.len() > crate::auth::MAX_PASSWORD_LEN {
            return Err(Error::AuthFailed);
        }
        if !self.ctx.auth.check_password(r.password, hash).await? {
            return Err(Error::AuthFailed);
        }
        let view = self.ctx.auth.view();
        // The password may have changed (or the user gone) while it was being checked.
        match view.user(&r.name) {
            Some((_, c)) if *c == cred => {}
            _ => return Err(Error::AuthFailed),
        }
        let token = self.ctx.auth.issue(&view, &r.name)?;
        Ok(AuthenticateResponse {
            header: self.ctx.header(self.rev()),
            token,
        })
    }

    async fn user_add(&self, req: Request<AuthUserAddRequest>) -> Result<AuthUserAddResponse> {
        let caller = self.root(&req)?;
        let r = req.into_inner();
        check_name(&r.name, Error::UserEmpty)?;
        no_prehashed(&r.hashed_password)?;
        let no_password = r.options.is_some_and(|o| o.no_password);
        let hash = if no_password {
            None
        } else {
            Some(self.ctx.auth.hash_password(r.password).await?)
        };
        let rev = self
            .propose(&caller, AuthCmd::UserAdd { name: r.name, hash })
            .await?;
        Ok(AuthUserAddResponse {
            header: self.ctx.header(rev),
        })
    }

    async fn user_get(&self, req: Request<AuthUserGetRequest>) -> Result<AuthUserGetResponse> {
        let caller = self.ctx.auth.caller_of(&req)?;
        let r = req.into_inner();
        if caller.name() != Some(r.name.as_str()) {
            caller.root()?;
        }
        self.ctx.member.read_barrier().await?;
        let st = self.ctx.state.read();
        let Some(u) = st.auth().users().get(&r.name) else {
            return Err(Error::UserNotFound);
        };
        Ok(AuthUserGetResponse {
            header: self.ctx.header(st.revision()),
            roles: u.roles.iter().cloned().collect(),
        })
    }

    async fn user_list(&self, req: Request<AuthUserListRequest>) -> Result<AuthUserListResponse> {
        self.root(&req)?;
        self.ctx.member.read_barrier().await?;
        let st = self.ctx.state.read();
        Ok(AuthUserListResponse {
            header: self.ctx.header(st.revision()),
            users: st.auth().users().keys().cloned().collect(),
        })
    }

    async fn role_get(&self, req: Request<AuthRoleGetRequest>) -> Result<AuthRoleGetResponse> {
        let caller = self.ctx.auth.caller_of(&req)?;
        let r = req.into_inner();
        check_name(&r.role, Error::RoleEmpty)?;
        self.ctx.member.read_barrier().await?;
        let st = self.ctx.state.read();
        if let Some(name) = caller.name() {
            let holds = st
                .auth()
                .users()
                .get(name)
                .is_some_and(|u| u.roles.contains(&r.role));
            if !holds {
                caller.root()?;
            }
        }
        let Some(perms) = st.auth().roles().get(&r.role) else {
            return Err(Error::RoleNotFound);
        };
        Ok(AuthRoleGetResponse {
            header: self.ctx.header(st.revision()),
            perm: perms
                .iter()
                .map(|p| authpb::Permission {
                    perm_type: match p.kind {
                        PermKind::Read => authpb::permission::Type::Read as i32,
                        PermKind::Write => authpb::permission::Type::Write as i32,
                        PermKind::ReadWrite => authpb::permission::Type::Readwrite as i32,
                    },
                    key: p.key.clone(),
                    range_end: p.end.clone(),
                })
                .collect(),
        })
    }

    async fn role_list(&self, req: Request<AuthRoleListRequest>) -> Result<AuthRoleListResponse> {
        self.root(&req)?;
        self.ctx.member.read_barrier().await?;
        let st = self.ctx.state.read();
        Ok(AuthRoleListResponse {
            header: self.ctx.header(st.revision()),
            roles: st.auth().roles().keys().cloned().collect(),
        })
    }

    async fn grant_permission(
        &self,
        req: Request<AuthRoleGrantPermissionRequest>,
    ) -> Result<AuthRoleGrantPermissionResponse> {
        let caller = self.root(&req)?;
        let r = req.into_inner();
        check_name(&r.name, Error::RoleEmpty)?;
        let Some(p) = r.perm else {
            return Err(Error::PermissionNotGiven);
        };
        let kind = match authpb::permission::Type::try_from(p.perm_type) {
            Ok(authpb::permission::Type::Read) => PermKind::Read,
            Ok(authpb::permission::Type::Write) => PermKind::Write,
            Ok(authpb::permission::Type::Readwrite) => PermKind::ReadWrite,
            Err(_) => {
                return Err(Error::InvalidArgument(format!(
                    "unknown permission type {}",
                    p.perm_type
                )));
            }
        };
        if p.key.is_empty() && p.range_end.is_empty() {
            return Err(Error::InvalidArgument("permission key is empty".into()));
        }
        let rev = self
            .propose(
                &caller,
                AuthCmd::RoleGrantPermission {
                    role: r.name,
                    perm: Perm {
                        kind,
                        key: p.key,
                        end: p.range_end,
                    },
                },
            )
            .await?;
        Ok(AuthRoleGrantPermissionResponse {
            header: self.ctx.header(rev),
        })
    }
}

fn done<T>(ctx: &Ctx, method: &'static str, r: Result<T>) -> Result<Response<T>, Status> {
    let r = r.map(Response::new).map_err(Status::from);
    ctx.metrics.rpc(method, &r);
    r
}

#[tonic::async_trait]
impl Auth for AuthService {
    #[tracing::instrument(
        skip_all,
        target = "request",
        level = "debug",
        name = "Auth.AuthEnable"
    )]
    async fn auth_enable(
        &self,
        _req: Request<AuthEnableRequest>,
    ) -> Result<Response<AuthEnableResponse>, Status> {
        let r = async {
            // Enabling what is enabled changes nothing (etcd answers success).
            if !self.ctx.auth.enabled() {
                let secret = new_secret();
                self.propose(&Caller::Open, AuthCmd::Enable { secret })
                    .await?;
            }
            Ok(AuthEnableResponse {
                header: self.ctx.header(self.rev()),
            })
        }
        .await;
        done(&self.ctx, "AuthEnable", r)
    }

    #[tracing::instrument(
        skip_all,
        target = "request",
        level = "debug",
        name = "Auth.AuthDisable"
    )]
    async fn auth_disable(
        &self,
        req: Request<AuthDisableRequest>,
    ) -> Result<Response<AuthDisableResponse>, Status> {
        let r = async {
            let caller = self.root(&req)?;
            let rev = self.propose(&caller, AuthCmd::Disable).await?;
            Ok(AuthDisableResponse {
                header: self.ctx.header(rev),
            })
        }
        .await;
        done(&self.ctx, "AuthDisable", r)
    }

    #[tracing::instrument(
        skip_all,
        target = "request",
        level = "debug",
        name = "Auth.AuthStatus"
    )]
    async fn auth_status(
        &self,
        _req: Request<AuthStatusRequest>,
    ) -> Result<Response<AuthStatusResponse>, Status> {
        let view = self.ctx.auth.view();
        let r = Ok(AuthStatusResponse {
            header: self.ctx.header(self.rev()),
            enabled: view.enabled,
            auth_revision: view.revision,
        });
        done(&self.ctx, "AuthStatus", r)
    }

    #[tracing::instrument(
        skip_all,
        target = "request",
        level = "debug",
        name = "Auth.Authenticate"
    )]
    async fn authenticate(
        &self,
        req: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        let r = self.authenticate(req.into_inner()).await;
        done(&self.ctx, "Authenticate", r)
    }

    #[tracing::instrument(skip_all, target = "request", level = "debug", name = "Auth.UserAdd")]
    async fn user_add(
        &self,
        req: Request<AuthUserAddRequest>,
    ) -> Result<Response<AuthUserAddResponse>, Status> {
        let r = AuthService::user_add(self, req).await;
        done(&self.ctx, "UserAdd", r)
    }

    #[tracing::instrument(skip_all, target = "request", level = "debug", name = "Auth.UserGet")]
    async fn user_get(
        &self,
        req: Request<AuthUserGetRequest>,
    ) -> Result<Response<AuthUserGetResponse>, Status> {
        let r = AuthService::user_get(self, req).await;
        done(&self.ctx, "UserGet", r)
    }

    #[tracing::instrument(skip_all, target = "request", level = "debug", name = "Auth.UserList")]
    async fn user_list(
        &self,
        req: Request<AuthUserListRequest>,
    ) -> Result<Response<AuthUserListResponse>, Status> {
        let r = AuthService::user_list(self, req).await;
        done(&self.ctx, "UserList", r)
    }

    #[tracing::instrument(
        skip_all,
        target = "request",
        level = "debug",
        name = "Auth.UserDelete"
    )]
    async fn user_delete(
        &self,
        req: Request<AuthUserDeleteRequest>,
    ) -> Result<Response<AuthUserDeleteResponse>, Status> {
        let r = async {
            let caller = self.root(&req)?;
            let r = req.into_inner();
            check_name(&r.name, Error::UserEmpty)?;
            let rev = self
                .propose(&caller, AuthCmd::UserDelete { name: r.name })
                .await?;
            Ok(AuthUserDeleteResponse {
                header: self.ctx.header(rev),
            })
        }
        .await;
        done(&self.ctx, "UserDelete", r)
    }

    #[tracing::instrument(
        skip_all,
        target = "request",
        level = "debug",
        name = "Auth.UserChangePassword"
    )]
    async fn user_change_password(
        &self,
        req: Request<AuthUserChangePasswordRequest>,
    ) -> Result<Response<AuthUserChangePasswordResponse>, Status> {
        let r = async {
            let caller = self.root(&req)?;
            let r = req.into_inner();
            check_name(&r.name, Error::UserEmpty)?;
            no_prehashed(&r.hashed_password)?;
            let hash = self.ctx.auth.hash_password(r.password).await?;
            let rev = self
                .propose(&caller, AuthCmd::UserChangePassword { name: r.name, hash })
                .await?;
            Ok(AuthUserChangePasswordResponse {
                header: self.ctx.header(rev),
            })
        }
        .await;
        done(&self.ctx, "UserChangePassword", r)
    }

    #[tracing::instrument(
        skip_all,
        target = "request",
        level = "debug",
        name = "Auth.UserGrantRole"
    )]
    async fn user_grant_role(
        &self,
        req: Request<AuthUserGrantRoleRequest>,
    ) -> Result<Response<AuthUserGrantRoleResponse>, Status> {
        let r = async {
            let caller = self.root(&req)?;
            let r = req.into_inner();
            check_name(&r.user, Error::UserEmpty)?;
            check_name(&r.role, Error::RoleEmpty)?;
            let rev = self
                .propose(
                    &caller,
                    AuthCmd::UserGrantRole {
                        user: r.user,
                        role: r.role,
                    },
                )
                .await?;
            Ok(AuthUserGrantRoleResponse {
                header: self.ctx.header(rev),
            })
        }
        .await;
        done(&self.ctx, "UserGrantRole", r)
    }

    #[tracing::instrument(
        skip_all,
        target = "request",
        level = "debug",
        name = "Auth.UserRevokeRole"
    )]
    async fn user_revoke_role(
        &self,
        req: Request<AuthUserRevokeRoleRequest>,
    ) -> Result<Response<AuthUserRevokeRoleResponse>, Status> {
        let r = async {
            let caller = self.root(&req)?;
            let r = req.into_inner();
            check_name(&r.name, Error::UserEmpty)?;
            check_name(&r.role, Error::RoleEmpty)?;
            let rev = self
                .propose(
                    &caller,
                    AuthCmd::UserRevokeRole {
                        user: r.name,
                        role: r.role,
                    },
                )
                .await?;
            Ok(AuthUserRevokeRoleResponse {
                header: self.ctx.header(rev),
            })
        }
        .await;
        done(&self.ctx, "UserRevokeRole", r)
    }

    #[tracing::instrument(skip_all, target = "request", level = "debug", name = "Auth.RoleAdd")]
    async fn role_add(
        &self,
        req: Request<AuthRoleAddRequest>,
    ) -> Result<Response<AuthRoleAddResponse>, Status> {
        let r = async {
            let caller = self.root(&req)?;
            let r = req.into_inner();
            check_name(&r.name, Error::RoleEmpty)?;
            let rev = self
                .propose(&caller, AuthCmd::RoleAdd { name: r.name })
                .await?;
            Ok(AuthRoleAddResponse {
                header: self.ctx.header(rev),
            })
        }
        .await;
        done(&self.ctx, "RoleAdd", r)
    }

    #[tracing::instrument(skip_all, target = "request", level = "debug", name = "Auth.RoleGet")]
    async fn role_get(
        &self,
        req: Request<AuthRoleGetRequest>,
    ) -> Result<Response<AuthRoleGetResponse>, Status> {
        let r = AuthService::role_get(self, req).await;
        done(&self.ctx, "RoleGet", r)
    }

    #[tracing::instrument(skip_all, target = "request", level = "debug", name = "Auth.RoleList")]
    async fn role_list(
        &self,
        req: Request<AuthRoleListRequest>,
    ) -> Result<Response<AuthRoleListResponse>, Status> {
        let r = AuthService::role_list(self, req).await;
        done(&self.ctx, "RoleList", r)
    }

    #[tracing::instrument(
        skip_all,
        target = "request",
        level = "debug",
        name = "Auth.RoleDelete"
    )]
    async fn role_delete(
        &self,
        req: Request<AuthRoleDeleteRequest>,
    ) -> Result<Response<AuthRoleDeleteResponse>, Status> {
        let r = async {
            let caller = self.root(&req)?;
            let r = req.into_inner();
            check_name(&r.role, Error::RoleEmpty)?;
            let rev = self
                .propose(&caller, AuthCmd::RoleDelete { name: r.role })
                .await?;
            Ok(AuthRoleDeleteResponse {
                header: self.ctx.header(rev),
            })
        }
        .await;
        done(&self.ctx, "RoleDelete", r)
    }

    #[tracing::instrument(
        skip_all,
        target = "request",
        level = "debug",
        name = "Auth.RoleGrantPermission"
    )]
    async fn role_grant_permission(
        &self,
        req: Request<AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<AuthRoleGrantPermissionResponse>, Status> {
        let r = self.grant_permission(req).await;
        done(&self.ctx, "RoleGrantPermission", r)
    }

    #[tracing::instrument(
        skip_all,
        target = "request",
        level = "debug",
        name = "Auth.RoleRevokePermission"
    )]
    async fn role_revoke_permission(
        &self,
        req: Request<AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<AuthRoleRevokePermissionResponse>, Status> {
        let r = async {
            let caller = self.root(&req)?;
            let r = req.into_inner();
            check_name(&r.role, Error::RoleEmpty)?;
            let rev = self
                .propose(
                    &caller,
                    AuthCmd::RoleRevokePermission {
                        role: r.role,
                        key: r.key,
                        end: r.range_end,
                    },
                )
                .await?;
            Ok(AuthRoleRevokePermissionResponse {
                header: self.ctx.header(rev),
            })
        }
        .await;
        done(&self.ctx, "RoleRevokePermission", r)
    }
}
